#!/usr/bin/env bash
# soft-topk's CPU backend against OTT-JAX's topk_mask and the paper's method (PyTorch), timed
# on this machine in one run, with the ratios printed at the end.
#
#   benches/compare/run.sh            # the four sizes of the bench report
#   benches/compare/run.sh --quick    # 1 x 1000 and 64 x 1000 only
#
# COMPARE_MAX_LOAD (default 1.0) and COMPARE_WAIT_S (default 900): before timing, wait up to
# that many seconds for the 1-minute load average to fall below that value, since other work
# on the machine shows up in every number. Each run keeps its files in target/compare/<time>/.
set -euo pipefail

cd "$(dirname "$0")/../.."
quick=()
[[ "${1:-}" == "--quick" ]] && quick=(--quick)
venv=target/compare-venv
out="target/compare/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out"

# The alternatives live in their own venv, pinned; a second run only checks the pins.
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet -r benches/compare/requirements.txt
"$venv/bin/pip" freeze > "$out/pip-freeze.txt"
cargo build --release --example bench_report

load1() { cut -d' ' -f1 /proc/loadavg; }
max_load="${COMPARE_MAX_LOAD:-1.0}"
deadline=$((SECONDS + ${COMPARE_WAIT_S:-900}))
while awk -v l="$(load1)" -v m="$max_load" 'BEGIN { exit !(l >= m) }'; do
    if ((SECONDS >= deadline)); then
        echo "load still $(load1) (>= $max_load): timing anyway" | tee -a "$out/uptime.txt"
        break
    fi
    echo "load $(load1) >= $max_load: waiting for a quieter machine" >&2
    sleep 20
done

# Our own threads lift the load average to about 2 while they time, so the load alone cannot
# say whether something else ran: every 5 s, note each process above 20% of a core.
monitor() {
    while sleep 5; do
        top -bn1 -w 200 | awk -v t="$(date +%T)" 'NR > 7 && $9 > 20 { print t, $9, $12 }'
    done
}
monitor > "$out/top.txt" &
monitor_pid=$!
trap 'kill "$monitor_pid" 2>/dev/null || true' EXIT

# Ours, then the alternatives, back to back; the load before, between and after is kept.
echo "before:  $(uptime)" | tee -a "$out/uptime.txt"
cargo run --quiet --release --example bench_report -- --no-gpu --topk "${quick[@]}" \
    | tee "$out/ours.jsonl"
echo "between: $(uptime)" | tee -a "$out/uptime.txt"
"$venv/bin/python" benches/compare/alternatives.py "${quick[@]}" | tee "$out/alternatives.jsonl"
echo "after:   $(uptime)" | tee -a "$out/uptime.txt"
kill "$monitor_pid" 2>/dev/null || true
others=$(grep -cvE ' (python|bench_report|cargo|top)$' "$out/top.txt" || true)
echo "processes not ours above 20% CPU: $others samples (every 5 s, in top.txt)" \
    | tee -a "$out/uptime.txt"

echo
"$venv/bin/python" benches/compare/table.py "$out/ours.jsonl" "$out/alternatives.jsonl" \
    | tee "$out/table.txt"
echo
cat "$out/uptime.txt"
echo "files: $out"
