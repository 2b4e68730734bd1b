#!/usr/bin/env bash
# Runs one fuzz target for SECONDS (default 900) on its seeds, with the
# per-target input limit, logging to fuzz/logs/TARGET.log.
#
#   fuzz/run.sh qcow2_open_read 900
#   fuzz/run.sh qcow2_open_read 60 --seeds-only   # no working corpus (fresh start)
#   fuzz/run.sh qcow2_write_check 900 -- -fork=1 -ignore_crashes=1
#       # keep going past a known crash (each crash still lands in artifacts/)
#
# The working corpus grows in fuzz/corpus/TARGET (not committed); crashes go
# to fuzz/artifacts/TARGET/. cargo-fuzz wants nightly; RUSTC_BOOTSTRAP=1
# lets the stable toolchain accept the sanitizer flags.
set -euo pipefail
cd "$(dirname "$0")"
target=$1
secs=${2:-900}
case $target in
qcow2_open_read | qcow2_write_check) seeds=qcow2 max_len=262144 ;;
ext4_free_map) seeds=ext4 max_len=524288 ;;
tar_populate) seeds=tar max_len=65536 ;;
pool_records) seeds=pool max_len=16384 ;;
*) echo "unknown target $target" >&2; exit 2 ;;
esac
shift 2 || shift $#
corpus=corpus/$target
if [ "${1:-}" = --seeds-only ]; then
    corpus=$(mktemp -d)
    shift
fi
[ "${1:-}" = -- ] && shift
mkdir -p "$corpus" "artifacts/$target" logs
export RUSTC_BOOTSTRAP=1
exec nice -n 10 cargo fuzz run "$target" "$corpus" "seeds/$seeds" -- \
    -max_total_time="$secs" -max_len="$max_len" -timeout=20 -rss_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix="artifacts/$target/" "$@" \
    >"logs/$target.log" 2>&1
