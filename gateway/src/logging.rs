//! The gateway's log subscriber: `SLUICE_LOG`'s directives, text or JSON lines.

/// The gateway's log: `directives` (SLUICE_LOG; `info` when invalid), as text or `json`
/// lines, written to `writer`.
pub fn subscriber<W>(
    directives: &str,
    json: bool,
    ansi: bool,
    writer: W,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    use tracing_subscriber::layer::SubscriberExt as _;
    let directives = Some(directives)
        .filter(|d| tracing_subscriber::EnvFilter::try_new(d).is_ok())
        .unwrap_or("info");
    let builder = tracing_subscriber::fmt()
        .with_ansi(ansi)
        .with_writer(writer);
    // Directives by target and level only (nearly always) filter with `Targets`, decided
    // once per call site. `EnvFilter`, needed for span and field directives
    // (`[request{request_id=…}]=debug`), also takes a lock each time any span is entered
    // or left: several times per request (about 1% of an HTTP publish's CPU). An empty
    // filter stays with `EnvFilter`, which reads it as `error`.
    let targets = directives
        .parse::<tracing_subscriber::filter::Targets>()
        .ok()
        .filter(|_| !directives.trim().is_empty() && !directives.contains('['));
    // The builder's own level (INFO unless told) would cap what `Targets` lets through.
    let all = tracing::level_filters::LevelFilter::TRACE;
    match (json, targets) {
        (false, Some(targets)) => Box::new(builder.with_max_level(all).finish().with(targets)),
        (true, Some(targets)) => {
            Box::new(builder.json().with_max_level(all).finish().with(targets))
        }
        (false, None) => Box::new(builder.with_env_filter(directives).finish()),
        (true, None) => Box::new(builder.json().with_env_filter(directives).finish()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a subscriber made from `directives` writes of one record per level, from
    /// two targets, inside and outside a `request` span.
    fn logged(directives: &str, json: bool) -> String {
        let log = crate::testing::LogBuffer::default();
        let sink = log.clone();
        let writer = move || sink.clone();
        let subscriber = subscriber(directives, json, false, writer);
        tracing::subscriber::with_default(subscriber, || {
            let span =
                tracing::info_span!(target: "sluice_gateway::x", "request", request_id = "r-1");
            span.in_scope(|| {
                tracing::debug!(target: "sluice_gateway::x", "gw-debug");
                tracing::info!(target: "sluice_gateway::x", "gw-info");
            });
            tracing::debug!(target: "wasmtime::y", "wt-debug");
            tracing::info!(target: "wasmtime::y", "wt-info");
            tracing::error!(target: "wasmtime::y", "wt-error");
        });
        log.text()
    }

    /// SLUICE_LOG reads as it always did, whichever filter takes it: levels per target
    /// (below `info` too), span directives, `info` for nonsense, `error` for an empty
    /// filter; in text and JSON, records inside a request carrying its id.
    #[test]
    fn sluice_log_directives_pick_the_records() {
        let names = ["gw-debug", "gw-info", "wt-debug", "wt-info", "wt-error"];
        for (directives, expected) in [
            ("", "wt-error"),
            ("info", "gw-info wt-info wt-error"),
            ("debug", "gw-debug gw-info wt-debug wt-info wt-error"),
            ("warn,sluice_gateway=debug", "gw-debug gw-info wt-error"),
            ("wasmtime=debug", "wt-debug wt-info wt-error"),
            ("[request]=debug", "gw-debug gw-info"),
            ("nonsense=[", "gw-info wt-info wt-error"),
            (" ", "gw-info wt-info wt-error"),
        ] {
            for json in [false, true] {
                let log = logged(directives, json);
                let written: Vec<&str> = names
                    .into_iter()
                    .filter(|name| log.contains(name))
                    .collect();
                assert_eq!(
                    written.join(" "),
                    expected,
                    "{directives:?} json {json}: {log}"
                );
                if let Some(inside) = log.lines().find(|line| line.contains("gw-info")) {
                    assert!(
                        inside.contains("r-1"),
                        "{directives:?} json {json}: {inside}"
                    );
                }
            }
        }
    }
}
