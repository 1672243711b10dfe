# Sourced by the bench scripts: builds the server into $bin and the load
# generators into $perf (magnetar-perf), makes a scratch
# $dir removed on exit with every process in $pids, and offers `port` (a free
# loopback port), `wait_line FILE TEXT` and `median WORKLOAD KEY` (over the
# lines "WORKLOAD key=value ..." collected in $dir/results).
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/magnetar-target}"
scripts/bootstrap
# MAGNETAR_BENCH_PROFILE=dev reuses the test build (dependencies optimised,
# Magnetar's own code at opt-level 1) instead of compiling a release build.
profile="${MAGNETAR_BENCH_PROFILE:-release}"
cargo build --profile "$profile" --locked -p magnetar -p magnetar-perf
case "$profile" in dev) out="$CARGO_TARGET_DIR/debug" ;; *) out="$CARGO_TARGET_DIR/$profile" ;; esac
bin="$out/magnetar"
perf="$out/magnetar-perf"

dir=$(mktemp -d "${MAGNETAR_BENCH_DIR:-${TMPDIR:-/tmp}}/magnetar-bench.XXXXXX")
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT

port() { python3 tests/kit/free_port.py; }
wait_line() { for _ in $(seq 200); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done; echo "timed out waiting for $1" >&2; exit 1; }
median() {
  grep "^$1 " "$dir/results" | sed -E "s/.*[ ]$2=(-?[0-9.]+).*/\1/" | sort -g |
    python3 -c 'import sys; v=[float(x) for x in sys.stdin]; print(v[len(v)//2] if v else "n/a")'
}
