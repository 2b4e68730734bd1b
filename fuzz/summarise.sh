#!/usr/bin/env bash
# Prints one table row per fuzz log: target, executions, edges (cov),
# features (ft), corpus entries/size, saved crash inputs (artifacts/).
#
#   fuzz/summarise.sh fuzz/logs/*.log
set -euo pipefail
printf '| log | executions | exec/s | edges (cov) | features (ft) | corpus | crashes |\n|---|---|---|---|---|---|---|\n'
for log in "$@"; do
    t=$(basename "$log" .log)
    last=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
    execs=$(grep -oE 'number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' || true)
    [ -n "$execs" ] || execs=$(sed -E 's/^#([0-9]+).*/\1/' <<<"$last")
    rate=$(grep -oE 'average_exec_per_sec: *[0-9]+' "$log" | grep -oE '[0-9]+$' || echo '?')
    cov=$(grep -oE 'cov: [0-9]+' <<<"$last" | cut -d" " -f2 || true)
    ft=$(grep -oE 'ft: [0-9]+' <<<"$last" | cut -d" " -f2 || true)
    corp=$(grep -oE 'corp: [0-9]+(/[0-9]+[a-zA-Z]+)?' <<<"$last" | cut -d" " -f2 || true)
    # Crash/timeout/OOM inputs saved by libFuzzer for this target.
    crashes=$(find "$(dirname "$log")/../artifacts/$t" -type f 2>/dev/null | wc -l || true)
    printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$t" "$execs" "$rate" "$cov" "$ft" "$corp" "$crashes"
done
