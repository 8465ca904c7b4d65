# The three servers that scripts/bench-baselines and scripts/bench-sweep compare, and the
# load run they share; sourced after lib.sh, not run.
#
#   nginx           `return 204` without reading anything into the application: the floor
#                   for an HTTP request on this machine;
#   wasmtime serve  benches/http-hello, a wasi:http component instantiated per request that
#                   reads the body and answers 204: the reference way to serve HTTP with
#                   WebAssembly;
#   sluice          the real gateway with its whole path: bearer-token authentication, the
#                   policy, one plugin (json-enricher), the routing rules, the durable
#                   spool, the local sink: issue 6's configuration for its targets ("with
#                   one plugin in the path");
#   sluice-2p       the same with a second plugin, the topic-router plugin deciding each
#                   message's destination (bench-baselines only).
#
# Each listens on a free loopback port. Every request of every server carries the same
# `Authorization` header, and is driven by the same sluice-load command.
#
# Environment: SLUICE_BENCH_BIN=/dir takes `sluice` and `sluice-load` from /dir instead of
# building the gateway (the plugins and http-hello are still built).

# `wasmtime serve` options. A fresh instance per request (serve's default for a WASIp2
# component, `--max-instance-reuse-count 1`), taken from the pooling allocator's
# pre-reserved slots: wasmtime's recommended set-up for serving. serve turns pooling on
# by itself when the address space allows; it is forced here so that a failed probe cannot
# silently change what is measured. Measured on the 2-vCPU machine of BENCHMARKS.md (64
# connections, alternating runs): without pooling, about 0.65x the rate; freed slots'
# pages returned to the kernel 64 at a time instead of one by one (decommit batches), up
# to 1.15x (within the noise in some runs); pages kept resident between instances, no
# gain. Reusing instances across requests (`--max-instance-reuse-count`) is about 3x as
# fast, but is no longer an instance per request, so it is not used. The pool's totals
# (1,000 by default), like serve's limits on concurrent connections and requests (1,000
# each: connection 1,001 would wait forever for a permit), are raised above the 1,024
# connections of scripts/bench-sweep.
WASMTIME_SERVE_OPTS=(
    -O pooling-allocator=y
    -O pooling-decommit-batch-size=64
    -O pooling-total-component-instances=4096
    -O pooling-total-core-instances=4096
    -O pooling-total-memories=4096
    -O pooling-total-tables=4096
    -O pooling-total-stacks=4096
    --max-concurrent-connections 4096
    --max-concurrent-requests 4096
)

# Installs nginx and (unless BENCH_WASMTIME=0: a script that does not run `wasmtime serve`)
# wasmtime if missing, builds the plugins and http-hello and (unless SLUICE_BENCH_BIN) the
# gateway, makes the work directory, and stops every server on exit. Sets $bin (sluice,
# sluice-load), $wasmtime and $work.
bench_setup() {
    command -v nginx >/dev/null || { say "installing nginx"; apt-get install -y -q nginx-light >/dev/null; }
    wasmtime=
    [[ ${BENCH_WASMTIME:-1} == 0 ]] || wasmtime=$("$ROOT/scripts/install-wasmtime")
    "$ROOT/scripts/build-plugins"
    cd "$ROOT"
    if [[ -n ${SLUICE_BENCH_BIN:-} ]]; then
        bin=$SLUICE_BENCH_BIN
        [[ -x $bin/sluice && -x $bin/sluice-load ]] || die "SLUICE_BENCH_BIN=$bin holds no sluice and sluice-load"
        say "using the prebuilt sluice and sluice-load in $bin"
        floor_bin=$bin/http_floor
    else
        cargo build --release -p sluice-gateway --bins --example http_floor
        bin="${CARGO_TARGET_DIR:-$ROOT/target}/release"
        floor_bin=$bin/examples/http_floor
    fi
    work=$(mktemp -d)
    trap bench_cleanup EXIT
}

bench_cleanup() {
    kill $(jobs -p) 2>/dev/null || true
    if [[ -f $work/nginx.pid ]]; then kill "$(cat "$work/nginx.pid")" 2>/dev/null || true; fi
    wait 2>/dev/null || true
    [[ ! -f $work/env/pids ]] || "$ROOT/scripts/test-env" stop "$work/env" >/dev/null 2>&1 || true
    rm -rf "$work"
}

# Raises the soft limit on open files to at least $1 (each connection is a socket in
# sluice-load and one in the server, both started from this shell).
need_open_files() {
    local soft hard
    soft=$(ulimit -Sn) hard=$(ulimit -Hn)
    [[ $soft == unlimited ]] || (( soft >= $1 )) && return 0
    [[ $hard == unlimited ]] || (( hard >= $1 )) ||
        die "needs $1 open files, the hard limit (ulimit -Hn) is $hard"
    ulimit -n "$1"
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Waits until $1 answers HTTP; $2 names the server in the error.
wait_http() {
    for _ in $(seq 300); do
        curl -s -o /dev/null "$1/" && return 0
        sleep 0.1
    done
    die "$2 does not answer on $1"
}

# Sets $nginx_url; NGINX_WORKERS worker processes (default auto: one per CPU). Keep-alive
# connections are never closed by nginx (its default closes each after 1,000 requests;
# sluice and wasmtime serve have no such limit), and bodies up to 2 MiB are taken (the
# sweep sends 1 MiB).
start_nginx() {
    local port
    port=$(free_port)
    cat >"$work/nginx.conf" <<CONF
worker_processes ${NGINX_WORKERS:-auto};
pid $work/nginx.pid;
error_log $work/nginx.err warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000000;
    client_max_body_size 2m;
    client_body_temp_path $work/body;
    server {
        listen 127.0.0.1:$port;
        location / { return 204; }
    }
}
CONF
    "${pinned[@]}" nginx -e "$work/nginx.err" -c "$work/nginx.conf"
    nginx_url="http://127.0.0.1:$port"
    wait_http "$nginx_url" nginx
}

# Sets $wasmtime_url.
start_wasmtime_serve() {
    local port
    port=$(free_port)
    "$wasmtime" serve --addr "127.0.0.1:$port" "${WASMTIME_SERVE_OPTS[@]}" \
        "$SLUICE_PLUGIN_DIR/http_hello.wasm" >"$work/wasmtime.out" 2>"$work/wasmtime.err" &
    wasmtime_pid=$!
    wasmtime_url="http://127.0.0.1:$port"
    for _ in $(seq 300); do
        curl -s -o /dev/null "$wasmtime_url/" && return 0
        kill -0 "$wasmtime_pid" 2>/dev/null || die "wasmtime serve exited: $(cat "$work/wasmtime.err")"
        sleep 0.1
    done
    die "wasmtime serve does not answer on $wasmtime_url"
}

bench_secret=bench-secret-0123456789abcdef0123456789abcdef

# Starts the gateway on an empty data directory (compiled plugins are cached across
# starts). $1: extra lines for [routing]; $2: extra TOML tables. SLUICE_INSTANCE=sluice-2p
# adds the router plugin, sluice-0p leaves out the enricher; SLUICE_DESTINATION sets the
# default destination (local). Sets $sluice_url, $sluice_pid, $sluice_data and $token (a
# device token for the Authorization header of every server), and $url_sluice,
# $url_sluice_2p or $url_sluice_0p.
start_sluice() {
    local name=${SLUICE_INSTANCE:-sluice} router= enricher
    enricher="[[plugins.transform]]
name = \"enricher\"
path = \"$SLUICE_PLUGIN_DIR/json_enricher.wasm\""
    # sluice-0p: the same path without a plugin, to measure what the plugin stage costs.
    [[ $name != sluice-0p ]] || enricher=
    if [[ $name == sluice-2p ]]; then
        router="[plugins.router]
name = \"router\"
path = \"$SLUICE_PLUGIN_DIR/topic_router.wasm\"
config = { kinesis_prefixes = \"telemetry/\" }"
    fi
    sluice_data=$work/data-$name
    rm -rf "$sluice_data"
    cat >"$work/$name.toml" <<TOML
[server]
listen = "127.0.0.1:0"
data_dir = "$work/data-$name"
[auth.tokens]
keys = [{ id = "bench", secret = "$bench_secret" }]
[[policy.grants]]
name = "load"
devices = ["*"]
publish = ["load/#"]
[plugins]
cache_dir = "$work/plugin-cache"
$enricher
$router
[routing]
default_destination = "${SLUICE_DESTINATION:-local}"
${1:-}
${2:-}
TOML
    token=$("$bin/sluice" token issue --config "$work/$name.toml" --device bench-device --ttl 12h)
    # Emptied here, not only by the redirection below: that happens in the background, and
    # until it has, the loop would read the previous gateway's address.
    : >"$work/$name.out"
    "${pinned[@]}" "$bin/sluice" run --config "$work/$name.toml" >"$work/$name.out" 2>"$work/$name.err" &
    sluice_pid=$!
    sluice_url=$(announced_address sluice "$sluice_pid" "$work/$name.out" "$work/$name.err" 'sluice: listening on ')
    printf -v "url_${name//-/_}" '%s' "$sluice_url"
}

# Prints the address server $1 (process $2) announced on a line of file $3 starting with
# $5, once it has; dies with its stderr (file $4) if it exits or takes a minute.
announced_address() {
    local address
    for _ in $(seq 600); do
        address=$(sed -n "s/^$5//p" "$3")
        [[ -z $address ]] || { echo "$address"; return 0; }
        kill -0 "$2" 2>/dev/null || die "$1 exited: $(cat "$4")"
        sleep 0.1
    done
    die "$1 did not start: $(cat "$4")"
}

# Starts gateway/examples/http_floor (bench-cores' `floor` servers), with `--durable` when
# $1 is floor-durable; sets $floor_pid and $floor_url.
start_floor() {
    local args=()
    [[ -x $floor_bin ]] || die "no $floor_bin (gateway/examples/http_floor.rs)"
    [[ $1 == floor ]] || { mkdir -p "$work/floor"; args=(--durable "$work/floor"); }
    : >"$work/floor.out"
    "${pinned[@]}" "$floor_bin" "${args[@]}" >"$work/floor.out" 2>"$work/floor.err" &
    floor_pid=$!
    floor_url=$(announced_address http_floor "$floor_pid" "$work/floor.out" "$work/floor.err" 'listening on ')
}

stop_floor() {
    kill "$floor_pid" 2>/dev/null || true
    wait "$floor_pid" 2>/dev/null || true
    rm -rf "$work/floor"
}

stop_sluice() {
    kill -TERM "$sluice_pid" 2>/dev/null || true
    wait "$sluice_pid" 2>/dev/null || true
    rm -rf "$sluice_data"
}

# The URL of server $1 (nginx, wasmtime-serve or sluice).
server_url() {
    case $1 in
        nginx) echo "$nginx_url" ;;
        wasmtime-serve) echo "$wasmtime_url" ;;
        sluice) echo "$url_sluice" ;;
        sluice-2p) echo "$url_sluice_2p" ;;
        *) die "no server $1" ;;
    esac
}

# One sluice-load run against server $1, its JSON report written to $2; the rest are
# sluice-load options (connections, duration, payload size, rate).
run_load() {
    local url
    url=$(server_url "$1")
    "$bin/sluice-load" --url "$url" --warmup 1 -H "authorization: Bearer $token" --json "${@:3}" >"$2"
}

# What a server's command starts with: `taskset -c $SERVER_CPUS` when set (the server on
# those CPUs, the load on the others), else nothing. (An array, not a function: a function
# run in the background is a subshell, and `$!` would name it, not the server.)
# `pin_servers CPUS` sets it for the servers started from then on.
pin_servers() {
    pinned=()
    [[ -z ${1:-} ]] || pinned=(taskset -c "$1")
}
pin_servers "${SERVER_CPUS:-}"

admin_token=bench-admin-token-0123456789

# Starts MQTT server $1 (mosquitto, mosquitto-persist, rabbitmq, sluice, sluice-enricher) on an empty
# data directory, on the CPUs in $SERVER_CPUS when set (`taskset`); sets $pid and $address
# (HOST:PORT of its MQTT listener) and, for sluice, $admin (its token: $admin_token).
start_mqtt_server() {
    rm -rf "$work/data" && mkdir -p "$work/data"
    : >"$work/out"
    admin=
    case $1 in
        mosquitto | mosquitto-persist)
            local port
            port=$(free_port)
            # Run as root (the bench's user), so that mosquitto can write the temporary
            # directory; the connection limit off, anonymous clients allowed.
            cat >"$work/mosquitto.conf" <<CONF
user root
listener $port 127.0.0.1
allow_anonymous true
max_connections -1
log_dest stderr
log_type error
log_type warning
CONF
            if [[ $1 == mosquitto-persist ]]; then
                printf 'persistence true\npersistence_location %s/\n' "$work/data" >>"$work/mosquitto.conf"
            else
                echo 'persistence false' >>"$work/mosquitto.conf"
            fi
            "${pinned[@]}" mosquitto -c "$work/mosquitto.conf" >"$work/out" 2>"$work/err" </dev/null &
            pid=$!
            for _ in $(seq 300); do
                if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
                    address=127.0.0.1:$port
                    return 0
                fi
                kill -0 "$pid" 2>/dev/null || die "mosquitto exited: $(cat "$work/err")"
                sleep 0.1
            done
            die "mosquitto does not answer on port $port"
            ;;
        rabbitmq)
            # RabbitMQ's MQTT plugin, the durable anchor: an MQTT broker that, like Sluice,
            # acknowledges QoS 1 only once the message is safe. A durable QoS 1
            # subscription to `#` (made once by mosquitto_sub, which then leaves) is a
            # durable queue that every publish is routed to; the plugin publishes QoS 1
            # messages persistent and PUBACKs on the queue's publisher confirm, sent once
            # the message is written and synced. The queue keeps the newest 200,000
            # (drop-head), so that a minute of load does not fill the memory.
            # Debian's wrappers in /usr/sbin switch to the rabbitmq user and lose the
            # environment; the bench runs its own node as itself, from the scripts behind.
            local rabbitmq_bin=/usr/lib/rabbitmq/bin
            [[ -x $rabbitmq_bin/rabbitmq-server ]] || {
                say "installing rabbitmq-server"
                apt-get install -y -q rabbitmq-server >/dev/null
                # Debian starts its own node where it can; the bench runs its own.
                service rabbitmq-server stop >/dev/null 2>&1 || true
            }
            command -v mosquitto_sub >/dev/null || apt-get install -y -q mosquitto-clients >/dev/null
            local port amqp node=bench$$@localhost
            port=$(free_port) amqp=$(free_port)
            mkdir -p "$work/data/rabbitmq"
            cat >"$work/rabbitmq.conf" <<CONF
listeners.tcp.default = 127.0.0.1:$amqp
mqtt.listeners.tcp.default = 127.0.0.1:$port
mqtt.allow_anonymous = true
disk_free_limit.absolute = 50MB
log.console = false
log.file.level = warning
CONF
            echo '[rabbitmq_mqtt].' >"$work/rabbitmq-plugins"
            rabbitmq_env=(env HOME="$work/data/rabbitmq" RABBITMQ_NODENAME="$node"
                RABBITMQ_CONFIG_FILE="$work/rabbitmq.conf"
                RABBITMQ_ENABLED_PLUGINS_FILE="$work/rabbitmq-plugins"
                RABBITMQ_MNESIA_BASE="$work/data/rabbitmq/mnesia"
                RABBITMQ_LOG_BASE="$work/data/rabbitmq/log"
                RABBITMQ_DIST_PORT="$(free_port)")
            "${pinned[@]}" "${rabbitmq_env[@]}" "$rabbitmq_bin/rabbitmq-server" >"$work/out" 2>"$work/err" </dev/null &
            pid=$! address=
            for _ in $(seq 600); do
                if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
                    address=127.0.0.1:$port
                    break
                fi
                kill -0 "$pid" 2>/dev/null || die "rabbitmq-server exited: $(cat "$work/err" "$work/out")"
                sleep 0.1
            done
            [[ -n $address ]] || die "RabbitMQ's MQTT does not answer on port $port"
            mosquitto_sub -h 127.0.0.1 -p "$port" -i bench-anchor -c -q 1 -t '#' -W 1 >/dev/null 2>&1 || true
            "${rabbitmq_env[@]}" "$rabbitmq_bin/rabbitmqctl" -n "$node" -q set_policy bench-cap '^mqtt-subscription-' \
                '{"max-length":200000,"overflow":"drop-head"}' --apply-to queues >/dev/null ||
                die "rabbitmqctl set_policy failed"
            "${rabbitmq_env[@]}" "$rabbitmq_bin/rabbitmqctl" -n "$node" -q list_queues name durable 2>/dev/null |
                grep -q 'mqtt-subscription-bench-anchorqos1.*true' || die "RabbitMQ has no durable queue for the anchor"
            return 0
            ;;
        sluice | sluice-enricher)
            local plugin=
            if [[ $1 == sluice-enricher ]]; then
                plugin="[plugins]
cache_dir = \"$work/plugin-cache\"
[[plugins.transform]]
name = \"enricher\"
path = \"$SLUICE_PLUGIN_DIR/json_enricher.wasm\""
            fi
            # The default path, the MQTT listener on loopback TCP; connections raised
            # above the 10,000 default for the memory run, and a short shutdown grace.
            cat >"$work/sluice.toml" <<TOML
[server]
listen = "127.0.0.1:0"
data_dir = "$work/data"
max_connections = 20000
shutdown_grace_ms = 2000
[mqtt]
listen = "127.0.0.1:0"
[routing]
default_destination = "local"
[admin]
listen = "127.0.0.1:0"
token = "$admin_token"
$plugin
TOML
            "${pinned[@]}" "$bin/sluice" run --config "$work/sluice.toml" >"$work/out" 2>"$work/err" </dev/null &
            pid=$!
            for _ in $(seq 600); do
                address=$(sed -n 's|^sluice: mqtt on mqtt://||p' "$work/out")
                admin=$(sed -n 's/^sluice: admin on //p' "$work/out")
                [[ -n $address ]] && grep -q '^sluice: listening on ' "$work/out" && return 0
                kill -0 "$pid" 2>/dev/null || die "sluice exited: $(cat "$work/err")"
                sleep 0.1
            done
            die "sluice did not start: $(cat "$work/err")"
            ;;
        *) die "no server $1" ;;
    esac
}

stop_mqtt_server() {
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

