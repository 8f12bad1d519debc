#!/usr/bin/env bash
# Issue 16's cost (item 6): eqmail with mail authentication against eqmail without it, in
# one invocation, runs interleaved (the order rotated per run), 5 KB x 10 sessions, one
# TCP connection per message.
#
#   bench/auth.sh                          # MODE=verify N=1000 RUNS=3
#   MODE=sign bench/auth.sh                # needs issue 16's signing (remote delivery)
#   MODE=both N=500 RUNS=1 bench/auth.sh   # smoke run of both
#
# MODE=verify -- SMTP acceptance of inbound mail, variants:
#   plain   control/authcheck absent
#   verify  control/authcheck 1: SPF + DKIM + DMARC (+ the forged-field filter, the
#           Authentication-Results field through the queue writer's prepend)
#   Both send the same DKIM-signed message (From: sender.test, RSA-2048, made by
#   eqmail.dkim.sign) from a NON-relay client (a second listener on INBOUND_PORT whose
#   rules give no RELAYCLIENT; the bench's usual listener is a relay client and would
#   skip the checks).  DNS: tests/dnsserver.py on loopback (control/dnsservers) publishes
#   sender.test's SPF, key and DMARC p=reject records: three TXT lookups per message,
#   answered by a Python server on the same two cores, no cache in between (a real site
#   has a caching resolver, so this is the dearer case).  Every variant switch is a
#   control/ change plus `eqmailctl reload`.  The first verify run's delivered message
#   must carry spf=pass, dkim=pass and dmarc=pass, or the bench stops (a bench that
#   measured timeouts would lie).
# MODE=sign -- relay-client mail end to end to a loopback SMTP sink (as bench/relay.sh:
#   control/smtproutes sends relay.test to the shared aiosmtpd sink, no fsync), variants:
#   relay   From: plain.test, which has no key: not signed
#   sign    From: signed.test, with an RSA-2048 key made by `eqmailctl dkim keygen`:
#           signed by remote delivery
#   Same listener, same route, same size; only the From: domain differs, so no reload.
#   The sink's first sign message must carry a DKIM-Signature with d=signed.test, or the
#   bench stops.
# Target (issue 16): each >= 0.85x of its plain variant (accept msg/s for verify; e2e
# msg/s to the sink, and acceptance, for sign).
# Environment: N, RUNS, SESSIONS (10), SIZE (5120), WARMUP (N/2 per variant, unmeasured),
# INBOUND_PORT (2728), SINK_PORT (2729), TIMEOUT, plus lib.sh's (EQ_PORT, EQ_VENV,
# BENCH_STATE, EQ_REV, ...).  Raw JSON: $BENCH_STATE/results/<stamp>-auth/.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
need_root
MODE="${MODE:-verify}"
N="${N:-1000}"
RUNS="${RUNS:-3}"
SESSIONS="${SESSIONS:-10}"
SIZE="${SIZE:-5120}"
WARMUP="${WARMUP:-$((N / 2))}"
TIMEOUT="${TIMEOUT:-300}"
INBOUND_PORT="${INBOUND_PORT:-2728}"
SINK_PORT="${SINK_PORT:-2729}"
SINK_DIR="$BENCH_STATE/auth-sink/Maildir"
OUT="${OUT:-$BENCH_STATE/results/$(date -u +%Y%m%dT%H%M%SZ)-auth}"
FIX="$OUT/fixtures"
case "$MODE" in
  verify) VARIANTS=(plain verify) ;;
  sign)   VARIANTS=(relay sign) ;;
  both)   VARIANTS=(plain verify relay sign) ;;
  *) echo "MODE must be verify, sign or both" >&2; exit 2 ;;
esac
mkdir -p "$OUT" "$SINK_DIR"/{new,cur,tmp}

cleanup() {
  eq_stop
  [ -n "${DNS_PID:-}" ] && kill "$DNS_PID" 2>/dev/null || true
  [ -n "${SINK_PID:-}" ] && kill "$SINK_PID" 2>/dev/null || true
}
trap cleanup EXIT

echo "== setup (results -> $OUT)"
eq_setup
"$EQ_PY" "$BENCH_HERE/auth_setup.py" make "$FIX" "$SIZE"
"$EQ_PY" "$BENCH_HERE/auth_setup.py" dns "$FIX" > "$OUT/dns.log" 2>&1 &
DNS_PID=$!
for _ in $(seq 100); do [ -s "$FIX/dns.port" ] && break; sleep 0.05; done
[ -s "$FIX/dns.port" ] || { echo "the loopback DNS server did not start; see $OUT/dns.log" >&2; exit 1; }
echo "127.0.0.1:$(cat "$FIX/dns.port")" > "$EQ_ROOT/control/dnsservers"
# the inbound listener: same options as the bench's, but no RELAYCLIENT for anyone
echo "smtp $EQ_ADDR:$INBOUND_PORT concurrency=$EQ_CONCURRENCY rules=tcp.inbound${EQ_PROCESSES:+ processes=$EQ_PROCESSES}" \
  >> "$EQ_ROOT/control/listen"
echo ':allow' > "$EQ_ROOT/control/tcp.inbound"
echo 0 > "$EQ_ROOT/control/concurrencyperclient"  # every bench client is 127.0.0.1
if [[ " ${VARIANTS[*]} " == *" sign "* ]]; then
  echo "relay.test:[127.0.0.1]:$SINK_PORT" > "$EQ_ROOT/control/smtproutes"
  "$EQCTL" --root "$EQ_ROOT" dkim keygen signed.test --selector bench --type rsa --bits 2048 \
    > "$OUT/dkim-record.txt"
  SINK_VENV="$BENCH_STATE/sink-venv"
  if ! "$SINK_VENV/bin/python" -c 'import aiosmtpd' 2>/dev/null; then
    /usr/bin/python3 -m venv "$SINK_VENV"
    "$SINK_VENV/bin/pip" install -q aiosmtpd
  fi
  port_free "$SINK_PORT"
  "$SINK_VENV/bin/python" "$SHARED_BENCH/aiosmtpd_sink.py" --port "$SINK_PORT" --maildir "$SINK_DIR" \
      --fsync none > "$OUT/sink.log" 2>&1 &
  SINK_PID=$!
fi
{ machine_info
  echo "MODE=$MODE variants=${VARIANTS[*]} N=$N RUNS=$RUNS SESSIONS=$SESSIONS SIZE=$SIZE WARMUP=$WARMUP"
  echo "eqmail listen: $(tr '\n' ';' < "$EQ_ROOT/control/listen")"
  echo "dns: tests/dnsserver.py on $(cat "$EQ_ROOT/control/dnsservers"); zone: $(tr -d '\n ' < "$FIX/zone.json" | cut -c1-200)..."
} | tee "$OUT/env.txt"
port_free "$INBOUND_PORT"
eq_start
wait_quiet | tee -a "$OUT/env.txt"
settle_after_delete | tee -a "$OUT/env.txt"

CURRENT=""
set_authcheck() {  # 0|1: control/authcheck, applied by a reload that returns when complete
  [ "$1" = "$CURRENT" ] && return 0
  if [ "$1" = 1 ]; then echo 1 > "$EQ_ROOT/control/authcheck"; else rm -f "$EQ_ROOT/control/authcheck"; fi
  "$EQCTL" --root "$EQ_ROOT" reload > /dev/null
  CURRENT="$1"
}
queue_empty() {
  for _ in $(seq 600); do [ -z "$(find "$EQ_ROOT/queue/mess" -type f -print -quit)" ] && return 0; sleep 0.1; done
}
select_variant() {  # in this shell, not in send's $(...) subshell: CURRENT must persist
  case "$1" in plain) set_authcheck 0 ;; verify) set_authcheck 1 ;; esac
}
send() {  # variant n label -> one JSON line on stdout (select_variant first)
  local v="$1" n="$2" label="$3" target msg sender to poll
  case "$v" in
    plain|verify) target="$EQ_ADDR:$INBOUND_PORT" msg="$FIX/signed.eml" sender="bench@sender.test"
                  to="$EQ_TO" poll="$EQ_MAILDIR_NEW" ;;
    relay|sign)   target="$EQ_ADDR:$EQ_PORT" sender="bench@$([ "$v" = sign ] && echo signed || echo plain).test"
                  msg="$FIX/plain-$([ "$v" = sign ] && echo signed || echo unsigned)-domain.eml"
                  to="user@relay.test" poll="$SINK_DIR/new" ;;
  esac
  queue_empty
  "$EQ_PY" "$BENCH_HERE/smtp_load.py" --target "$target" --sender "$sender" --to "$to" \
      --message "$msg" -n "$n" -s "$SESSIONS" --poll-dir "$poll" --timeout "$TIMEOUT" --label "$label"
}
cpu_snapshot() {  # "pid ticks title" of every eqmail process (utime + stime)
  local p
  for p in $(eq_pids); do
    [ -r "/proc/$p/stat" ] || continue
    # utime + stime: fields 14 and 15, counted after the ")" that ends the command name
    # (a process title such as "eqmail: queue writer" puts blanks in that name)
    echo "$p $(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12 + $13}') $(tr '\0' ' ' < "/proc/$p/cmdline" | cut -c1-60)"
  done
}
newest() { ls -t "$1" | sed -n 1p; }  # sed reads on: no SIGPIPE for ls under pipefail
check_variant() {  # the first measured run of a checked variant must show the feature working
  local v="$1" f
  case "$v" in
    verify)
      f="$EQ_MAILDIR_NEW/$(newest "$EQ_MAILDIR_NEW")"
      sed -n '/^$/q;p' "$f" | tr -d '\n' | sed 's/\t/ /g' > "$OUT/verify-header.txt"
      for want in "Authentication-Results: bench.test;" "spf=pass" "dkim=pass" "dmarc=pass"; do
        grep -qF "$want" "$OUT/verify-header.txt" || {
          echo "verification check failed: no '$want' in $f:" >&2; sed -n '1,12p' "$f" >&2; exit 1; }
      done
      echo "verify check: $(grep -o 'Authentication-Results: bench.test;[^:]*' "$OUT/verify-header.txt" | cut -c1-240)" ;;
    sign)
      f="$SINK_DIR/new/$(newest "$SINK_DIR/new")"
      "$EQ_PY" - "$f" <<'PYEOF' || { echo "signing check failed: no DKIM-Signature with d=signed.test in $f (is issue 16's signing merged?)" >&2; exit 1; }
import re, sys
head = re.sub(rb"\r\n", b"\n", open(sys.argv[1], "rb").read()).split(b"\n\n", 1)[0]
fields = [re.sub(rb"\n[ \t]+", b" ", x) for x in re.split(rb"\n(?![ \t])", head)]
sigs = [x for x in fields if x.lower().startswith(b"dkim-signature:") and re.search(rb"\bd=signed\.test\b", x)]
print("sign check:", sigs[0][:120].decode() if sigs else "none")
sys.exit(0 if sigs else 1)
PYEOF
      ;;
    relay)
      f="$SINK_DIR/new/$(newest "$SINK_DIR/new")"
      if grep -q '^DKIM-Signature:' "$f"; then echo "relay variant was signed: $f" >&2; exit 1; fi ;;
    plain)
      f="$EQ_MAILDIR_NEW/$(newest "$EQ_MAILDIR_NEW")"
      if grep -q '^Authentication-Results: bench.test' "$f"; then echo "plain variant was checked: $f" >&2; exit 1; fi ;;
  esac
}

if [ "$WARMUP" -gt 0 ]; then
  echo "== warm-up: $WARMUP messages per variant (not measured)"
  for v in "${VARIANTS[@]}"; do select_variant "$v"; send "$v" "$WARMUP" "warmup-$v" > "$OUT/warmup-$v.json"; done
fi

echo "== runs (N=$N, ${SESSIONS} sessions, ${SIZE} B, one connection per message)"
printf '%-8s %3s %9s %10s %9s %10s %6s %6s\n' variant run accept_s accept_m/s e2e_s e2e_m/s errors deliv
: > "$OUT/raw-runs.jsonl"
for run in $(seq "$RUNS"); do
  k=$(( (run - 1) % ${#VARIANTS[@]} ))
  for i in $(seq 0 $(( ${#VARIANTS[@]} - 1 ))); do
    v="${VARIANTS[$(( (i + k) % ${#VARIANTS[@]} ))]}"
    select_variant "$v"
    cpu_snapshot > "$OUT/cpu-before"
    line=$(send "$v" "$N" "$v")
    cpu_snapshot > "$OUT/cpu-after"
    "$EQ_PY" - "$OUT/cpu-before" "$OUT/cpu-after" "$N" "$v" "$run" >> "$OUT/cpu.jsonl" <<'PYEOF'
import json, os, sys
hz = os.sysconf("SC_CLK_TCK")
def read(p):
    out = {}
    for line in open(p):
        pid, ticks, title = line.rstrip("\n").split(" ", 2)
        out[(pid, title)] = int(ticks)
    return out
a, b, n = read(sys.argv[1]), read(sys.argv[2]), int(sys.argv[3])
per = {}
for k, t in b.items():
    name = k[1].strip()
    per[name] = per.get(name, 0) + (t - a.get(k, t)) * 1000 / hz / n
print(json.dumps({"variant": sys.argv[4], "run": int(sys.argv[5]), "cpu_ms_per_msg": {k: round(v, 3) for k, v in sorted(per.items())}}))
PYEOF
    echo "$line" | "$EQ_PY" -c 'import json,sys; j=json.loads(sys.stdin.read()); j["run"]=int(sys.argv[1]); print(json.dumps(j))' "$run" >> "$OUT/raw-runs.jsonl"
    echo "$line" | "$EQ_PY" -c 'import json,sys; j=json.loads(sys.stdin.read()); print("%-8s %3s %9s %10s %9s %10s %6s %6s" % (j["label"], sys.argv[1], j["accept_s"], j["accept_mps"], j["e2e_s"], j["e2e_mps"], j["errors"], j["delivered"]))' "$run"
    if [ "$run" = 1 ]; then check_variant "$v" > "$OUT/check-$v.txt"; cat "$OUT/check-$v.txt" | tee -a "$OUT/env.txt"; fi
  done
done
set_authcheck 0

queue_empty
cp "$EQ_ROOT/log/eqmail.log" "$OUT/eqmail.log" 2>/dev/null || true
bad=$(grep -c -E 'warning|alert|error|Traceback|crashed|exited|restart' "$OUT/eqmail.log" || true)
echo "eqmail log lines with warning/alert/error/Traceback/restart: $bad" | tee "$OUT/eqmail-after.txt"
grep -E 'warning|alert|error|Traceback|crashed|exited|restart' "$OUT/eqmail.log" | sort | uniq -c | sort -rn | head -10 | tee -a "$OUT/eqmail-after.txt" || true
echo "load after: $(cut -d" " -f1-3 /proc/loadavg)" | tee -a "$OUT/env.txt"

"$EQ_PY" - "$OUT" <<'EOF' | tee "$OUT/table.md"
import json, os, statistics, sys
d = sys.argv[1]
runs = [json.loads(l) for l in open(os.path.join(d, "raw-runs.jsonl")) if l.strip()]
med = lambda xs: statistics.median(xs) if xs else None
f = lambda x, nd=0: "-" if x is None else f"{x:,.{nd}f}"
base_of = {"plain": "plain", "verify": "plain", "relay": "relay", "sign": "relay"}
desc = {"plain": "inbound, authcheck off", "verify": "inbound, authcheck on (SPF+DKIM+DMARC)",
        "relay": "relay client -> sink, no key", "sign": "relay client -> sink, DKIM-signed"}
stat = {}
for lab in dict.fromkeys(r["label"] for r in runs):
    g = [r for r in runs if r["label"] == lab]
    stat[lab] = {"accept_mps": med([r["accept_mps"] for r in g]),
                 "e2e_mps": med([r["e2e_mps"] for r in g if r["e2e_mps"]]),
                 "runs": [r["accept_mps"] for r in g],
                 "ok": sum(1 for r in g if r["errors"] == 0 and r["e2e_mps"])}
print("| variant | accept msg/s (median; runs) | **accept vs base** | e2e msg/s | e2e vs base | ok runs |")
print("|---|---:|---:|---:|---:|---|")
rows = []
for lab, s in stat.items():
    b = stat.get(base_of[lab], {})
    ra = s["accept_mps"] / b["accept_mps"] if b.get("accept_mps") else None
    re_ = s["e2e_mps"] / b["e2e_mps"] if s["e2e_mps"] and b.get("e2e_mps") else None
    rows.append({"variant": lab, **s, "accept_vs_base": ra, "e2e_vs_base": re_})
    runs_txt = ", ".join(f(x) for x in s["runs"])
    print(f"| {desc.get(lab, lab)} | {f(s['accept_mps'])} ({runs_txt}) | **{f(ra, 2)}×** | {f(s['e2e_mps'])} "
          f"| {f(re_, 2)}× | {s['ok']}/{len(s['runs'])} |")
print("\nTarget (issue 16): verify and sign each >= 0.85x of their base (plain, relay).")
cpu = [json.loads(l) for l in open(os.path.join(d, "cpu.jsonl")) if l.strip()]
names = sorted({k for c in cpu for k in c["cpu_ms_per_msg"]})
if cpu:
    print("\nCPU ms per message of each eqmail process (median over runs):\n")
    print("| process | " + " | ".join(stat) + " |")
    print("|---|" + "---:|" * len(stat))
    for nm in names:
        vals = [f(med([c["cpu_ms_per_msg"].get(nm, 0) for c in cpu if c["variant"] == lab]), 2) for lab in stat]
        print(f"| {nm} | " + " | ".join(vals) + " |")
json.dump({"tool": "eqmail-bench-auth", "variants": rows}, open(os.path.join(d, "summary.json"), "w"), indent=1)
EOF
