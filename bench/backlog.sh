#!/usr/bin/env bash
# Issue 15, backlog: eqmail and Postfix with B deferred remote messages to a dead
# destination in the queue, against the same servers with an empty queue, side by side
# in one invocation.
#
#   bench/backlog.sh                 # B=100000, N=2000, 5 KB x 10 sessions
#   B=5000 N=500 bench/backlog.sh    # smoke run
#
# The dead destination is dead.test, routed to 127.0.0.1:DEAD_PORT (2799), where nothing
# listens (connection refused): eqmail by control/smtproutes, Postfix by transport_maps.
# eqmail's backlog is written straight into its stopped queue (bench/backlog_fill.py:
# preprocessed, deferred, next tries spread over the coming hour, 512-byte messages);
# Postfix's is injected by smtp-source (512 bytes, 20 sessions) to the dead transport
# and waits in deferred/ (there is no other way to make one).
#
# Measured for each server, empty queue first, then with the backlog:
#   * acceptance and local end-to-end msg/s (mta_bench.py, N messages, CELL);
#   * restart to ready: stop, then `eqmailctl start` (returns when every worker said it
#     is ready) until the SMTP port answers / `postfix start` until the port answers;
#   * `eqmailctl queue stat`, `eqmailctl queue list` and `postqueue -p` wall time;
#   * eqmail's scanner RSS (VmRSS) and its difference per queued message;
#   * with the backlog: connection attempts to the dead port and the scanner's CPU for
#     HOLD seconds undisturbed, then for HOLD seconds after a flush of both queues
#     (`eqmailctl queue flush`, `postqueue -f`), which makes every message due, and
#     in total until Postfix has deferred its whole backlog again (the backlog phase
#     is measured only after that: Postfix's retry storm would slow both servers).
# Output: a table; raw files in $BENCH_STATE/results/<stamp>-backlog/.  Both queues are
# emptied at the end (eqmail's instance is deleted; postsuper -d ALL for Postfix).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
need_root

B="${B:-100000}"
N="${N:-2000}"
CELL="${CELL:-5120x10}"
HOLD="${HOLD:-30}"
TIMEOUT="${TIMEOUT:-300}"
DEAD=dead.test
DEAD_PORT="${DEAD_PORT:-2799}"
OUT="${OUT:-$BENCH_STATE/results/$(date -u +%Y%m%dT%H%M%SZ)-backlog}"
RES="$OUT/metrics.txt"
mkdir -p "$OUT"
: > "$RES"

cleanup() {
  eq_stop
  postsuper -c "$PF_CONF" -d ALL >/dev/null 2>&1 || true
  pf_stop
}
trap cleanup EXIT

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.3f", b - a}'; }
metric() { echo "$1 $2" | tee -a "$RES"; }
wait_port() { for _ in $(seq 600); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.02; done; return 1; }
scanner_pid() {
  "$EQCTL" --root "$EQ_ROOT" status --json | "$EQ_PY" -c '
import json, sys
print(next(w["pid"] for w in json.load(sys.stdin)["workers"] if w["kind"] == "scanner"))'
}
cpu_s() { awk -v t="$(getconf CLK_TCK)" '{sub(/.*\) /, ""); split($0, f, " "); printf "%.2f", (f[12] + f[13]) / t}' "/proc/$1/stat"; }
rss_kb() { awk '/^VmRSS:/{print $2}' "/proc/$1/status"; }
eq_attempts() { grep -c "wasn't able to establish an SMTP connection" "$EQ_ROOT/log/eqmail.log" || true; }
pf_attempts() { grep -c "connect to 127.0.0.1\[127.0.0.1\]:$DEAD_PORT: Connection refused" "$PF_LOG" || true; }

echo "== setup (results -> $OUT)"
port_free "$DEAD_PORT"  # must stay closed: the dead destination
pf_setup
postconf -c "$PF_CONF" -e \
  "transport_maps = inline:{$DEAD=smtp:[127.0.0.1]:$DEAD_PORT}" \
  "default_transport = smtp" "relay_transport = smtp" "smtp_tls_security_level = none"
postsuper -c "$PF_CONF" -d ALL >/dev/null 2>&1 || true
eq_setup
echo "$DEAD:[127.0.0.1]:$DEAD_PORT" > "$EQ_ROOT/control/smtproutes"
{ machine_info; echo "B=$B N=$N CELL=$CELL HOLD=$HOLD dead destination: $DEAD -> 127.0.0.1:$DEAD_PORT (closed)"; } | tee "$OUT/env.txt"
pf_start
eq_start
wait_quiet | tee -a "$OUT/env.txt"
settle_after_delete | tee -a "$OUT/env.txt"

one() {  # label target polldir to
  "$PY" "$SHARED_BENCH/mta_bench.py" --target "$2" --poll-dir "$3" --to "$4" --label "$1" \
      -n "$N" --runs 1 --matrix "$CELL" --timeout "$TIMEOUT" --jsonl "$OUT/raw-runs.jsonl" \
      > "$OUT/last-$1.txt" 2>&1 || true
  sed -n '3p;/smtp-source:/p' "$OUT/last-$1.txt"
  cat "$OUT/last-$1.txt" >> "$OUT/$1.txt"
}

phase() {  # empty|backlog
  local p="$1" t
  echo "== phase: $p"
  for t in postfix eqmail; do  # warm-up, not measured
    if [ "$t" = postfix ]; then tgt="$POSTFIX_ADDR:$POSTFIX_PORT"; poll="$PF_MAILDIR_NEW"; to="$PF_TO"
    else tgt="$EQ_ADDR:$EQ_PORT"; poll="$EQ_MAILDIR_NEW"; to="$EQ_TO"; fi
    "$PY" "$SHARED_BENCH/mta_bench.py" --target "$tgt" --poll-dir "$poll" --to "$to" --label "warmup-$t" \
        -n "$N" --runs 1 --matrix 5120x10 --timeout "$TIMEOUT" > "$OUT/warmup-$p-$t.txt" 2>&1 || true
  done
  one "postfix-$p" "$POSTFIX_ADDR:$POSTFIX_PORT" "$PF_MAILDIR_NEW" "$PF_TO"
  one "eqmail-$p" "$EQ_ADDR:$EQ_PORT" "$EQ_MAILDIR_NEW" "$EQ_TO"
  one "eqmail-$p" "$EQ_ADDR:$EQ_PORT" "$EQ_MAILDIR_NEW" "$EQ_TO"
  one "postfix-$p" "$POSTFIX_ADDR:$POSTFIX_PORT" "$PF_MAILDIR_NEW" "$PF_TO"
  t=$(now); "$EQCTL" --root "$EQ_ROOT" queue stat > "$OUT/queue-stat-$p.txt"; metric "eq_queue_stat_s_$p" "$(since "$t")"
  t=$(now); "$EQCTL" --root "$EQ_ROOT" queue list > "$OUT/queue-list-$p.txt"; metric "eq_queue_list_s_$p" "$(since "$t")"
  t=$(now); postqueue -c "$PF_CONF" -p > "$OUT/postqueue-$p.txt"; metric "pf_postqueue_s_$p" "$(since "$t")"
  metric "eq_scanner_rss_kb_$p" "$(rss_kb "$(scanner_pid)")"
  eq_stop
  t=$(now); "$EQCTL" --root "$EQ_ROOT" start; wait_port "$EQ_PORT"; metric "eq_start_ready_s_$p" "$(since "$t")"
  pf_stop
  t=$(now); postfix -c "$PF_CONF" start >/dev/null 2>&1; wait_port "$POSTFIX_PORT"; metric "pf_start_ready_s_$p" "$(since "$t")"
  sleep 2
}

phase empty

echo "== backlog: $B messages to $DEAD in each queue"
eq_stop
# both fills at once (eqmail's is written while it is stopped, then it starts)
( t=$(now); "$EQ_PY" "$BENCH_HERE/backlog_fill.py" "$EQ_ROOT/queue" "$B" "user@$DEAD" 512
  metric eq_fill_s "$(since "$t")"; eq_start ) &
EQ_FILL=$!
t=$(now)
smtp-source -s 20 -m "$B" -l 512 -f "sender@$BENCH_DOMAIN" -t "user@$DEAD" "$POSTFIX_ADDR:$POSTFIX_PORT" \
    > "$OUT/pf-fill.txt" 2>&1 || true
for _ in $(seq 1200); do  # until every message waits in deferred/
  n=$(find "$PF_QUEUE/deferred" -type f | wc -l)
  [ "$n" -ge "$B" ] && break
  sleep 1
done
metric pf_fill_s "$(since "$t")"
metric pf_deferred "$(find "$PF_QUEUE/deferred" -type f | wc -l)"
wait "$EQ_FILL"
# the scanner reads the queue after readiness: let it finish before measuring
for _ in $(seq 600); do grep -q "status: queue read in" "$EQ_ROOT/log/eqmail.log" && break; sleep 0.5; done
grep "status: queue read in" "$EQ_ROOT/log/eqmail.log" | tail -1 | tee -a "$OUT/env.txt"

echo "== dead destination, undisturbed for ${HOLD}s"
sp=$(scanner_pid); c0=$(cpu_s "$sp"); e0=$(eq_attempts); p0=$(pf_attempts)
sleep "$HOLD"
metric eq_attempts_quiet "$(( $(eq_attempts) - e0 ))"
metric pf_attempts_quiet "$(( $(pf_attempts) - p0 ))"
metric eq_scanner_cpu_s_quiet "$(awk -v a="$c0" -v b="$(cpu_s "$sp")" 'BEGIN{printf "%.2f", b - a}')"
echo "== dead destination, ${HOLD}s after a flush of both queues"
c0=$(cpu_s "$sp"); e0=$(eq_attempts); p0=$(pf_attempts)
"$EQCTL" --root "$EQ_ROOT" queue flush >/dev/null; postqueue -c "$PF_CONF" -f
sleep "$HOLD"
metric eq_attempts_flush "$(( $(eq_attempts) - e0 ))"
metric pf_attempts_flush "$(( $(pf_attempts) - p0 ))"
metric eq_scanner_cpu_s_flush "$(awk -v a="$c0" -v b="$(cpu_s "$sp")" 'BEGIN{printf "%.2f", b - a}')"
"$EQCTL" --root "$EQ_ROOT" status | grep -i "destination" | tee -a "$OUT/env.txt" || true
# the flush keeps Postfix busy re-deferring its backlog for minutes: measuring during it
# would charge that to both servers' rates, so wait until its active queue is empty
t=$(now)
for _ in $(seq 1200); do
  [ -z "$(find "$PF_QUEUE/active" "$PF_QUEUE/incoming" -type f -print -quit)" ] && break
  sleep 1
done
metric pf_flush_drain_s "$(awk -v h="$HOLD" -v s="$(since "$t")" 'BEGIN{printf "%.1f", h + s}')"
metric pf_attempts_after_flush_total "$(( $(pf_attempts) - p0 ))"
metric eq_attempts_after_flush_total "$(( $(eq_attempts) - e0 ))"
metric eq_scanner_cpu_s_after_flush_total "$(awk -v a="$c0" -v b="$(cpu_s "$sp")" 'BEGIN{printf "%.2f", b - a}')"
sleep 5

phase backlog

echo "load after: $(cut -d" " -f1-3 /proc/loadavg)" | tee -a "$OUT/env.txt"
cp "$EQ_ROOT/log/eqmail.log" "$OUT/eqmail.log" 2>/dev/null || true
cp "$PF_LOG" "$OUT/postfix.log" 2>/dev/null || true
eq_stop
rm -rf "$EQ_ROOT"; sync; date +%s > "$BENCH_STATE/.deleted-at"  # see settle_after_delete

"$PY" - "$OUT" "$B" <<'EOF' | tee "$OUT/table.md"
import json, statistics, sys
out, b = sys.argv[1], int(sys.argv[2])
m = dict(line.split() for line in open(f"{out}/metrics.txt") if line.strip())
runs = [json.loads(l) for l in open(f"{out}/raw-runs.jsonl")]
def med(label, key):
    v = [r[key] for r in runs if r["label"] == label and r.get(key)]
    return statistics.median(v) if v else float("nan")
f = lambda k: float(m.get(k, "nan"))
print(f"| B = {b} | eqmail empty | eqmail backlog | backlog/empty | Postfix empty | Postfix backlog | backlog/empty |")
print("|---|---|---|---|---|---|---|")
for name, key in (("acceptance msg/s", "accept_mps"), ("end to end msg/s", "e2e_mps")):
    e0, e1 = med("eqmail-empty", key), med("eqmail-backlog", key)
    p0, p1 = med("postfix-empty", key), med("postfix-backlog", key)
    print(f"| {name} | {e0:.0f} | {e1:.0f} | {e1 / e0:.2f} | {p0:.0f} | {p1:.0f} | {p1 / p0:.2f} |")
for name, ek, pk in (("restart to ready s", "eq_start_ready_s", "pf_start_ready_s"),
                     ("queue stat s (Postfix: -)", "eq_queue_stat_s", None),
                     ("queue list s / postqueue -p s", "eq_queue_list_s", "pf_postqueue_s")):
    e0, e1 = f(ek + "_empty"), f(ek + "_backlog")
    p0, p1 = (f(pk + "_empty"), f(pk + "_backlog")) if pk else (float("nan"),) * 2
    print(f"| {name} | {e0:.2f} | {e1:.2f} | | {p0:.2f} | {p1:.2f} | |")
r0, r1 = f("eq_scanner_rss_kb_empty"), f("eq_scanner_rss_kb_backlog")
print(f"\nscanner RSS: {r0 / 1024:.1f} MiB empty, {r1 / 1024:.1f} MiB with the backlog: "
      f"{(r1 - r0) * 1024 / b:.0f} bytes per queued message")
for k in ("eq_attempts_quiet", "pf_attempts_quiet", "eq_scanner_cpu_s_quiet", "eq_attempts_flush",
          "pf_attempts_flush", "eq_scanner_cpu_s_flush", "pf_flush_drain_s",
          "eq_attempts_after_flush_total", "pf_attempts_after_flush_total",
          "eq_scanner_cpu_s_after_flush_total", "eq_fill_s", "pf_fill_s", "pf_deferred"):
    print(f"{k}: {m.get(k)}")
EOF
