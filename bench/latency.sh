#!/usr/bin/env bash
# Delivery latency (end of DATA -> file in Maildir/new), median / p90 / p99, at a steady
# open-loop load of half the measured maximum, eqmail vs Postfix.
#
#   bench/latency.sh                     # calibrate, then 20 s per target
#   RATE=150 DURATION=30 bench/latency.sh
#
# Calibration (unless RATE is given): one smtp-source run of CAL_N (default 1000) 5 KB
# messages at 10 sessions against each server; the maximum is each one's end-to-end
# msg/s, and RATE = half of the LOWER of the two, so both servers see the same offered
# load (a latency comparison at different loads would say little).
# Raw JSON: $BENCH_STATE/results/<stamp>-latency/.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
need_root
DURATION="${DURATION:-20}"
CAL_N="${CAL_N:-1000}"
SIZE="${SIZE:-5120}"
OUT="${OUT:-$BENCH_STATE/results/$(date -u +%Y%m%dT%H%M%SZ)-latency}"
mkdir -p "$OUT"
cleanup() { eq_stop; pf_stop; }
trap cleanup EXIT

pf_setup
eq_setup
machine_info > "$OUT/env.txt"
pf_start
eq_start

wait_quiet | tee -a "$OUT/env.txt"
settle_after_delete | tee -a "$OUT/env.txt"
if [ -z "${RATE:-}" ]; then
  echo "== calibration: $CAL_N x 5 KB, 10 sessions"
  "$PY" "$SHARED_BENCH/mta_bench.py" --target "$POSTFIX_ADDR:$POSTFIX_PORT" --poll-dir "$PF_MAILDIR_NEW" --to "$PF_TO" \
      --label postfix -n "$CAL_N" --runs 1 --matrix 5120x10 | tail -n1 > "$OUT/cal-postfix.json"
  "$PY" "$SHARED_BENCH/mta_bench.py" --target "$EQ_ADDR:$EQ_PORT" --poll-dir "$EQ_MAILDIR_NEW" --to "$EQ_TO" \
      --label eqmail -n "$CAL_N" --runs 1 --matrix 5120x10 | tail -n1 > "$OUT/cal-eqmail.json"
  RATE=$("$PY" - "$OUT" <<'EOF'
import json, sys, os
d = sys.argv[1]
m = [json.load(open(os.path.join(d, f"cal-{t}.json")))["summary"][0]["median_e2e_mps"] for t in ("postfix", "eqmail")]
print(f"{0.5 * min(m):.0f}")
sys.stderr.write(f"max e2e msg/s: postfix {m[0]:.0f}, eqmail {m[1]:.0f} -> RATE {0.5 * min(m):.0f}\n")
EOF
)
fi
echo "RATE=$RATE DURATION=$DURATION SIZE=$SIZE" | tee -a "$OUT/env.txt"
sleep 2

echo "== Postfix at $RATE msg/s"
"$EQ_PY" "$BENCH_HERE/latency.py" --port "$POSTFIX_PORT" --maildir "$BENCH_HOME/Maildir" --to "$PF_TO" \
    --rate "$RATE" --duration "$DURATION" --size "$SIZE" --label postfix --dump "$OUT/postfix-msgs.jsonl" | tee "$OUT/postfix.json" || true
sleep 2
echo "== eqmail at $RATE msg/s"
"$EQ_PY" "$BENCH_HERE/latency.py" --port "$EQ_PORT" --maildir "$EQ_HOME/Maildir" --to "$EQ_TO" \
    --rate "$RATE" --duration "$DURATION" --size "$SIZE" --label eqmail --dump "$OUT/eqmail-msgs.jsonl" | tee "$OUT/eqmail.json" || true
cp "$EQ_ROOT/log/eqmail.log" "$OUT/eqmail.log" 2>/dev/null || true

"$PY" - "$OUT" <<'EOF' | tee "$OUT/table.md"
import json, sys, os
d = sys.argv[1]
rows = {t: json.load(open(os.path.join(d, f"{t}.json"))) for t in ("postfix", "eqmail")}
f = lambda x: "-" if x is None else f"{x:.1f}"
print("| server | rate msg/s (achieved) | sent / acked / delivered | lost after 250 | delivery median ms | p90 | p99 | max | accept (dot->250) median ms | p99 |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for name, j in (("Postfix", rows["postfix"]), ("eqmail", rows["eqmail"])):
    dl, ac = j["delivery_ms"], j["accept_ms"]
    print(f"| {name} | {j['rate']:.0f} ({j['achieved_rate']}) | {j['sent']} / {j['acked']} / {j['delivered']} | {j['lost_count']} | "
          f"{f(dl['median'])} | {f(dl['p90'])} | {f(dl['p99'])} | {f(dl['max'])} | {f(ac['median'])} | {f(ac['p99'])} |")
pf, eq = rows["postfix"]["delivery_ms"], rows["eqmail"]["delivery_ms"]
if pf["median"] and eq["median"]:
    print(f"\neqmail/Postfix delivery latency: median {eq['median'] / pf['median']:.2f}x, p99 {eq['p99'] / pf['p99']:.2f}x (lower is better)")
EOF
