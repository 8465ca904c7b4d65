# Shared by the scripts in this folder; sourced, not run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Where the built plugin components are copied; the demo config and the tests read them here.
export SLUICE_PLUGIN_DIR="${SLUICE_PLUGIN_DIR:-$ROOT/target/plugins}"
die() { printf '%s: %s\n' "$(basename "$0")" "$*" >&2; exit 1; }
say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
