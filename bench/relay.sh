#!/usr/bin/env bash
# Remote relay throughput, eqmail vs Postfix, side by side in one invocation: messages
# for relay.test arrive by SMTP (smtp-source through the shared harness) and each MTA
# relays them over SMTP to the same loopback sink (the shared aiosmtpd sink, no fsync,
# writing Maildir files); "e2e msg/s" is N / time until the Nth file is in the sink.
#
#   bench/relay.sh                    # N=1000, RUNS=2, 5 KB x 10 sessions
#   N=300 RUNS=1 bench/relay.sh       # smoke run
#
# eqmail routes relay.test with control/smtproutes (`relay.test:[127.0.0.1]:SINK_PORT`);
# Postfix with transport_maps (inline:{relay.test=smtp:[127.0.0.1]:SINK_PORT}) in its
# private config under $BENCH_STATE (the shared harness files are not changed).
# Output: a table with eqmail/Postfix ratios; raw JSON in $BENCH_STATE/results/<stamp>-relay/.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
need_root

N="${N:-1000}"
RUNS="${RUNS:-2}"
MATRIX="${MATRIX:-5120x10}"
TIMEOUT="${TIMEOUT:-300}"
SINK_PORT="${RELAY_SINK_PORT:-2727}"
SINK_DIR="$BENCH_STATE/relay-sink/Maildir"
OUT="${OUT:-$BENCH_STATE/results/$(date -u +%Y%m%dT%H%M%SZ)-relay}"
mkdir -p "$OUT" "$SINK_DIR"

SINK_VENV="$BENCH_STATE/sink-venv"
if ! "$SINK_VENV/bin/python" -c 'import aiosmtpd' 2>/dev/null; then
  /usr/bin/python3 -m venv "$SINK_VENV"
  "$SINK_VENV/bin/pip" install -q aiosmtpd
fi

cleanup() {
  eq_stop; pf_stop
  [ -n "${SINK_PID:-}" ] && kill "$SINK_PID" 2>/dev/null || true
}
trap cleanup EXIT

echo "== setup (results -> $OUT)"
pf_setup
postconf -c "$PF_CONF" -e \
  "transport_maps = inline:{relay.test=smtp:[127.0.0.1]:$SINK_PORT}" \
  "default_transport = smtp" "relay_transport = smtp" \
  "smtp_tls_security_level = none"
eq_setup
echo "relay.test:[127.0.0.1]:$SINK_PORT" > "$EQ_ROOT/control/smtproutes"
port_free "$SINK_PORT"
"$SINK_VENV/bin/python" "$SHARED_BENCH/aiosmtpd_sink.py" --port "$SINK_PORT" --maildir "$SINK_DIR" \
    --fsync none > "$OUT/sink.log" 2>&1 &
SINK_PID=$!
{ machine_info; echo "N=$N RUNS=$RUNS MATRIX=$MATRIX sink=aiosmtpd (no fsync) on 127.0.0.1:$SINK_PORT"; } | tee "$OUT/env.txt"
pf_start
eq_start
wait_quiet | tee -a "$OUT/env.txt"
settle_after_delete | tee -a "$OUT/env.txt"

one() {  # label target cell
  "$PY" "$SHARED_BENCH/mta_bench.py" --target "$2" --poll-dir "$SINK_DIR/new" --to "user@relay.test" \
      --label "$1" -n "$N" --runs 1 --matrix "$3" --timeout "$TIMEOUT" --jsonl "$OUT/raw-runs.jsonl" \
      > "$OUT/last-$1.txt" 2>&1 || true
  sed -n '3p;/smtp-source:/p' "$OUT/last-$1.txt"
  cat "$OUT/last-$1.txt" >> "$OUT/$1.txt"
}

echo "== runs (N=$N per run)"
IFS=, read -ra CELLS <<< "$MATRIX"
for run in $(seq "$RUNS"); do
  for cell in "${CELLS[@]}"; do
    if [ $((run % 2)) = 1 ]; then order="postfix eqmail"; else order="eqmail postfix"; fi
    for t in $order; do
      if [ "$t" = postfix ]; then one postfix "$POSTFIX_ADDR:$POSTFIX_PORT" "$cell"
      else one eqmail "$EQ_ADDR:$EQ_PORT" "$cell"; fi
    done
  done
done
cp "$EQ_ROOT/log/eqmail.log" "$OUT/eqmail.log" 2>/dev/null || true
"$PY" "$BENCH_HERE/compare.py" "$OUT" | tee "$OUT/table.md"
