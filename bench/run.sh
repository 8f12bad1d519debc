#!/usr/bin/env bash
# eqmail vs Postfix, side by side in one invocation: SMTP acceptance and end to end to
# a Maildir, measured with Postfix's smtp-source through the shared harness
# (../shared/bench/mta_bench.py).
#
#   bench/run.sh                 # N=2000, RUNS=3, 5 KB x {1,10,50} (N) and 100 KB x {1,10,50} (500 each)
#   QUICK=1 bench/run.sh         # N=300, RUNS=1 (smoke run, ~2 min)
#   N=500 RUNS=1 MATRIX=5120x10 bench/run.sh
#
# Environment: BENCH_STATE (default /var/tmp/eqmail-bench), N, RUNS, MATRIX, EQ_PORT (2726), POSTFIX_PORT (2725),
# EQ_CONCURRENCY (100), EQ_PROCESSES (listener processes=, default eqmail's), TIMEOUT (s per run),
# EQ_REV (worktree | git rev), QUIET_WAIT/QUIET_LOAD (wait for a quiet machine first),
# WARMUP (messages sent to each server before the measured runs, default N; 0 = none),
# SETTLE (seconds between deleting the previous instance and measuring, default 65; see lib.sh).
# Runs are interleaved (cell by cell, Postfix and eqmail alternating, order flipped every
# run) so that drift on this shared VM hits both targets alike.
# Output: a table with medians and eqmail/Postfix ratios; raw JSON under
# $BENCH_STATE/results/<stamp>-throughput/ (raw-runs.jsonl, summary.json, env.txt, logs).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
need_root

if [ "${QUICK:-0}" = 1 ]; then N="${N:-300}"; RUNS="${RUNS:-1}"; fi
N="${N:-2000}"
RUNS="${RUNS:-3}"
# issue 8's matrix: 2000 x 5 KB and 500 x 100 KB, each at 1, 10 and 50 sessions
# (a cell's ":MESSAGES" overrides N for that cell)
MATRIX="${MATRIX:-5120x1,5120x10,5120x50,102400x1:500,102400x10:500,102400x50:500}"
TIMEOUT="${TIMEOUT:-300}"
OUT="${OUT:-$BENCH_STATE/results/$(date -u +%Y%m%dT%H%M%SZ)-throughput}"
mkdir -p "$OUT"

cleanup() { eq_stop; pf_stop; }
trap cleanup EXIT

echo "== setup (results -> $OUT)"
pf_setup
eq_setup
{ machine_info; echo "N=$N RUNS=$RUNS MATRIX=$MATRIX eqmail listen: $(cat "$EQ_ROOT/control/listen")"; } | tee "$OUT/env.txt"
if [ "$EQ_REV" = worktree ]; then  # the exact code measured, since the work tree moves
  tar -C "$PROJECT" -czf "$OUT/eqmail-src.tar.gz" --exclude=__pycache__ eqmail
fi
pf_start
eq_start
wait_quiet | tee -a "$OUT/env.txt"
settle_after_delete | tee -a "$OUT/env.txt"

one() {  # label target polldir to cell  (cell: SIZExCONC or SIZExCONC:MESSAGES)
  local label="$1" target="$2" poll="$3" to="$4" cell="${5%%:*}" n="$N"
  [ "$5" != "$cell" ] && n="${5#*:}"
  "$PY" "$SHARED_BENCH/mta_bench.py" --target "$target" --poll-dir "$poll" --to "$to" --label "$label" \
      -n "$n" --runs 1 --matrix "$cell" --timeout "$TIMEOUT" --jsonl "$OUT/raw-runs.jsonl" \
      > "$OUT/last-$label.txt" 2>&1 || true
  sed -n '3p;/smtp-source:/p' "$OUT/last-$label.txt"
  cat "$OUT/last-$label.txt" >> "$OUT/$label.txt"
}

# Warm-up, not measured: both servers take WARMUP messages (5 KB, 10 sessions) and
# deliver them, then both Maildirs are emptied.  A freshly started server pays one-time
# costs in its first burst (eqmail: its spare-inode pools are empty, so every queue file
# is created, right after this script deleted the previous instance's files); a running
# server does not.  WARMUP=0 measures the cold start.
WARMUP="${WARMUP:-$N}"
if [ "$WARMUP" -gt 0 ]; then
  echo "== warm-up: $WARMUP messages to each server (not measured)"
  for t in postfix eqmail; do
    if [ "$t" = postfix ]; then tgt="$POSTFIX_ADDR:$POSTFIX_PORT"; poll="$PF_MAILDIR_NEW"; to="$PF_TO"
    else tgt="$EQ_ADDR:$EQ_PORT"; poll="$EQ_MAILDIR_NEW"; to="$EQ_TO"; fi
    "$PY" "$SHARED_BENCH/mta_bench.py" --target "$tgt" --poll-dir "$poll" --to "$to" --label "warmup-$t" \
        -n "$WARMUP" --runs 1 --matrix 5120x10 --timeout "$TIMEOUT" > "$OUT/warmup-$t.txt" 2>&1 || true
  done
fi

echo "== runs (N=$N per run; one TCP connection per message)"
printf '%-14s %7s %4s %3s %9s %9s %8s %9s %6s %6s %3s\n' target size conc run accept_s acc_msg/s e2e_s e2e_msg/s deliv cpu% rc
IFS=, read -ra CELLS <<< "$MATRIX"
for run in $(seq "$RUNS"); do
  for cell in "${CELLS[@]}"; do
    if [ $((run % 2)) = 1 ]; then order="postfix eqmail"; else order="eqmail postfix"; fi
    for t in $order; do
      if [ "$t" = postfix ]; then
        one postfix "$POSTFIX_ADDR:$POSTFIX_PORT" "$PF_MAILDIR_NEW" "$PF_TO" "$cell"
      else
        one eqmail "$EQ_ADDR:$EQ_PORT" "$EQ_MAILDIR_NEW" "$EQ_TO" "$cell"
      fi
    done
  done
done

echo "== after the runs: eqmail queue and log"
for _ in $(seq 100); do
  left=$(find "$EQ_ROOT/queue/mess" -type f | wc -l)
  [ "$left" = 0 ] && break
  sleep 0.1
done
echo "eqmail queue files left in mess/: $left" | tee "$OUT/eqmail-after.txt"
"$EQCTL" --root "$EQ_ROOT" queue stat 2>&1 | tee -a "$OUT/eqmail-after.txt" || true
cp "$EQ_ROOT/log/eqmail.log" "$OUT/eqmail.log" 2>/dev/null || true
cp "$PF_LOG" "$OUT/postfix.log" 2>/dev/null || true
bad=$(grep -c -E 'warning|alert|error|Traceback|crashed|exited|restart' "$OUT/eqmail.log" || true)
echo "eqmail log lines with warning/alert/error/Traceback/restart: $bad" | tee -a "$OUT/eqmail-after.txt"
grep -E 'warning|alert|error|Traceback|crashed|exited|restart' "$OUT/eqmail.log" | head -20 | tee -a "$OUT/eqmail-after.txt" || true
grep -c -E 'warning|fatal|panic' "$OUT/postfix.log" 2>/dev/null | sed 's/^/postfix log lines with warning|fatal|panic: /' | tee -a "$OUT/eqmail-after.txt" || true

echo
echo "load after: $(cut -d" " -f1-3 /proc/loadavg)" | tee -a "$OUT/env.txt"
"$PY" "$BENCH_HERE/compare.py" "$OUT" | tee "$OUT/table.md"
