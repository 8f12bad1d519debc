#!/usr/bin/env bash
# Issue 17's cost (item 7): relay throughput with the outbound TLS policies (DANE and
# MTA-STS lookups on, the policy cached) against the same run without them, eqmail
# against itself in one invocation, runs interleaved (the order rotated per run), 5 KB x
# 10 sessions, one TCP connection per message (bench/smtp_load.py, as bench/auth.sh).
#
#   bench/tlspolicy.sh                     # N=1000 RUNS=3
#   N=2000 RUNS=3 bench/tlspolicy.sh       # the recorded run
#   N=300 RUNS=1 WARMUP=100 bench/tlspolicy.sh   # smoke run
#
# Mail for user@relay.test comes from a relay client (the bench's usual listener) and is
# delivered by eqmail's remote delivery through an MX lookup -- NOT control/smtproutes:
# a route gets no DANE or MTA-STS -- to a STARTTLS sink (bench/tlspolicy_sink.py: the
# shared aiosmtpd sink's Maildir writer, no fsync) on port 25 of SINK_IP, a loopback
# address of its own.  "e2e" is N / the time until the Nth file is in the sink.
# bench/tlspolicy_setup.py serves the rest on loopback:
#   DNS   tests/dnssec.py's DnssecWorld (nsd + a validating unbound with a private signed
#         root); relay.test is SIGNED: MX 10 mx.relay.test, mx.relay.test A SINK_IP,
#         _25._tcp.mx.relay.test TLSA 3 1 1 (the sink's key), _mta-sts.relay.test TXT,
#         mta-sts.relay.test A STS_IP.  control/dnsservers = that unbound, in BOTH variants.
#   HTTPS tests/stsserver.py on STS_IP port 443: relay.test's policy, mode enforce,
#         mx: mx.relay.test.
#   CA    one test CA issued the sink's and the policy server's certificates; it is
#         control/tlsca.pem.  So the sink's certificate meets DANE and MTA-STS alike.
# Variants (switched by control/ files + `eqmailctl reload`, as bench/auth.sh does):
#   opportunistic  control/dnssec 0, control/mtasts 0: same DNS, same sink, opportunistic
#                  STARTTLS (the certificate is not checked)
#   policy         control/dnssec 1, control/mtasts 1: MX/A with DNSSEC, the TLSA lookup,
#                  the MTA-STS lookup (policy worker; cached by the warm-up), DANE-EE
#                  verification of the sink's key (DANE takes precedence over MTA-STS),
#                  a TLS-RPT record per session and a log line per delivery
# The first measured policy run must show the feature working or the bench stops: its
# log has "remote: msg ... dane TLS to mx.relay.test [SINK_IP]: TLSA 3 1 1 ..." and
# `eqmailctl tlsrpt --json` has successful sessions for relay.test; the first
# opportunistic run's log must have no such line.
# Target (issue 17): policy >= 0.9x of opportunistic.  Output: the table, CPU ms per
# message of every eqmail process and of the fixtures (unbound, nsd, the sink) per
# variant, raw JSON in $BENCH_STATE/results/<stamp>-tlspolicy/.
# PROFILE=1 adds one unmeasured run per variant with py-spy (PYSPY, default the venv's)
# on the remote delivery worker and the scanner for PROFILE_DUR (8) s.
# Environment: N, RUNS, SESSIONS (10), SIZE (5120), WARMUP (N/2 per variant, unmeasured),
# SINK_IP (127.61.17.25), STS_IP (127.61.17.43), TIMEOUT, SINK_VENV, plus lib.sh's
# (EQ_PORT, EQ_VENV, BENCH_STATE, EQ_REV, ...).  While others use the machine, set
# BENCH_STATE and EQ_PORT (and the two addresses) to values of your own.  Needs root
# (port 25 and 443, privilege-separated eqmail), nsd, unbound and ldnsutils.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
need_root
N="${N:-1000}"
RUNS="${RUNS:-3}"
SESSIONS="${SESSIONS:-10}"
SIZE="${SIZE:-5120}"
WARMUP="${WARMUP:-$((N / 2))}"
TIMEOUT="${TIMEOUT:-300}"
SINK_IP="${SINK_IP:-127.61.17.25}"
STS_IP="${STS_IP:-127.61.17.43}"
SINK_VENV="${SINK_VENV:-$BENCH_STATE/sink-venv}"
SINK_BASE="$BENCH_STATE/tlspolicy-sink"
SINK_DIR="$SINK_BASE/Maildir"
OUT="${OUT:-$BENCH_STATE/results/$(date -u +%Y%m%dT%H%M%SZ)-tlspolicy}"
FIX="$OUT/fixtures"
VARIANTS=(opportunistic policy)
TO="user@relay.test"

for ip in "$SINK_IP" "$STS_IP"; do
  case "$ip" in 127.*) ;; *) echo "$ip: SINK_IP and STS_IP must be 127.x.y.z addresses" >&2; exit 2 ;; esac
done
[ "$SINK_IP" != "$STS_IP" ] || { echo "SINK_IP and STS_IP must differ" >&2; exit 2; }
[ "$SINK_IP" != 127.0.0.1 ] || { echo "SINK_IP must not be 127.0.0.1 (one of eqmail's own addresses: qmail's self-MX rule)" >&2; exit 2; }

addr_port_free() {  # ip port: nobody listens there, nor on the wildcard address
  if ss -Hltn "sport = :$2" | awk '{print $4}' | grep -qE "^($1|0\.0\.0\.0|\*|\[::\]):$2\$"; then
    echo "port $2 is in use at $1 (or on every address):" >&2; ss -Hltnp "sport = :$2" >&2; return 1
  fi
}

cleanup() {
  eq_stop
  [ -n "${SINK_PID:-}" ] && kill "$SINK_PID" 2>/dev/null || true
  if [ -n "${FIX_PID:-}" ]; then
    kill "$FIX_PID" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$FIX_PID" 2>/dev/null || break; sleep 0.1; done
  fi
  # nsd and unbound are the fixture process's children; should it have died without
  # stopping them, stop them here (their pids, nothing else)
  if [ -s "${FIX:-/nonexistent}/pids" ]; then
    while read -r p; do
      [ -r "/proc/$p/cmdline" ] && tr '\0' ' ' < "/proc/$p/cmdline" | grep -qE '^(nsd|unbound) -d -c /tmp/eqmail-dnssec-' \
        && kill "$p" 2>/dev/null || true
    done < "$FIX/pids"
  fi
  if [ -d "$SINK_BASE" ]; then
    rm -rf "$SINK_BASE"
    date +%s > "$BENCH_STATE/.deleted-at"  # see settle_after_delete (lib.sh)
  fi
}
trap cleanup EXIT

echo "== setup (results -> $OUT)"
mkdir -p "$OUT"
addr_port_free "$SINK_IP" 25
addr_port_free "$STS_IP" 443
if ! "$SINK_VENV/bin/python" -c 'import aiosmtpd' 2>/dev/null; then
  /usr/bin/python3 -m venv "$SINK_VENV"
  "$SINK_VENV/bin/pip" install -q aiosmtpd
fi
eq_setup
rm -rf "$SINK_BASE"; mkdir -p "$SINK_DIR"/{new,cur,tmp}
"$EQ_PY" "$BENCH_HERE/tlspolicy_setup.py" serve "$FIX" "$SIZE" "$SINK_IP" "$STS_IP" > "$OUT/fixtures.log" 2>&1 &
FIX_PID=$!
for _ in $(seq 600); do
  [ -s "$FIX/dnsservers" ] && break
  kill -0 "$FIX_PID" 2>/dev/null || break
  sleep 0.1
done
[ -s "$FIX/dnsservers" ] || { echo "the DNS/HTTPS fixtures did not start; see $OUT/fixtures.log:" >&2; tail -20 "$OUT/fixtures.log" >&2; exit 1; }
"$SINK_VENV/bin/python" "$BENCH_HERE/tlspolicy_sink.py" --host "$SINK_IP" --port 25 --maildir "$SINK_DIR" \
    --cert "$FIX/sink.pem" --shared "$SHARED_BENCH" > "$OUT/sink.log" 2>&1 &
SINK_PID=$!
for _ in $(seq 100); do (exec 3<>"/dev/tcp/$SINK_IP/25") 2>/dev/null && break; sleep 0.1; done
(exec 3<>"/dev/tcp/$SINK_IP/25") 2>/dev/null || { echo "the sink did not start; see $OUT/sink.log" >&2; exit 1; }

cp "$FIX/dnsservers" "$EQ_ROOT/control/dnsservers"
install -m 0644 "$FIX/ca.pem" "$EQ_ROOT/control/tlsca.pem"
echo 0 > "$EQ_ROOT/control/dnssec"
echo 0 > "$EQ_ROOT/control/mtasts"
{ machine_info
  [ -n "${PYTHONPATH:-}" ] && echo "PYTHONPATH (code measured first): $PYTHONPATH"
  echo "variants=${VARIANTS[*]} N=$N RUNS=$RUNS SESSIONS=$SESSIONS SIZE=$SIZE WARMUP=$WARMUP"
  echo "eqmail listen: $(tr '\n' ';' < "$EQ_ROOT/control/listen")"
  echo "dns: tests/dnssec.py DnssecWorld (nsd + validating unbound) at $(cat "$FIX/dnsservers"); relay.test SIGNED"
  echo "records: $(tr -d '\n ' < "$FIX/records.json" | cut -c1-400)"
  echo "sink: bench/tlspolicy_sink.py (aiosmtpd, STARTTLS, no fsync) on $SINK_IP:25; MTA-STS policy server on $STS_IP:443"
} | tee "$OUT/env.txt"
eq_start
wait_quiet | tee -a "$OUT/env.txt"
settle_after_delete | tee -a "$OUT/env.txt"

CURRENT=""
set_policy() {  # 0|1: control/dnssec and control/mtasts, applied by a reload that returns when complete
  [ "$1" = "$CURRENT" ] && return 0
  echo "$1" > "$EQ_ROOT/control/dnssec"
  echo "$1" > "$EQ_ROOT/control/mtasts"
  "$EQCTL" --root "$EQ_ROOT" reload > /dev/null
  CURRENT="$1"
}
select_variant() {  # in this shell, not in send's $(...) subshell: CURRENT must persist
  case "$1" in opportunistic) set_policy 0 ;; policy) set_policy 1 ;; esac
}
queue_empty() {
  for _ in $(seq 600); do [ -z "$(find "$EQ_ROOT/queue/mess" -type f -print -quit)" ] && return 0; sleep 0.1; done
}
send() {  # n label -> one JSON line on stdout (select_variant first)
  queue_empty
  "$EQ_PY" "$BENCH_HERE/smtp_load.py" --target "$EQ_ADDR:$EQ_PORT" --sender "bench@$EQ_DOMAIN" --to "$TO" \
      --message "$FIX/message.eml" -n "$1" -s "$SESSIONS" --poll-dir "$SINK_DIR/new" --timeout "$TIMEOUT" --label "$2"
}
set_aside() {  # label: the sink's new/ moves away (a rename: no deletion, and the next poll lists few files)
  mv "$SINK_DIR/new" "$SINK_BASE/$1"
  mkdir "$SINK_DIR/new"
}
log_size() { stat -c %s "$EQ_ROOT/log/eqmail.log" 2>/dev/null || echo 0; }
cpu_snapshot() {  # "pid ticks title" of every eqmail process and of the fixtures (utime + stime)
  local p title
  for p in $(eq_pids) $(cat "$FIX/pids") "$SINK_PID" "$FIX_PID"; do
    [ -r "/proc/$p/stat" ] || continue
    case "$p" in
      "$SINK_PID") title="fixture: STARTTLS sink (aiosmtpd)" ;;
      "$FIX_PID") title="fixture: MTA-STS HTTPS server" ;;
      *) title=$(tr '\0' ' ' < "/proc/$p/cmdline" | cut -c1-60)
         case "$title" in nsd\ *|unbound\ *) title="fixture: ${title%% *}" ;; esac ;;
    esac
    # utime + stime: fields 14 and 15, counted after the ")" that ends the command name
    # (a process title such as "eqmail: queue writer" puts blanks in that name)
    echo "$p $(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12 + $13}') $title"
  done
}
DANE_RE="remote: msg [0-9]+ to relay\.test: dane TLS to mx\.relay\.test \[$SINK_IP\]: TLSA 3 1 1 "
POLICY_RE="remote: msg [0-9]+ to relay\.test: [a-z-]+ TLS to mx\.relay\.test"
check_variant() {  # variant log-offset: the first measured run of each variant shows what it measured
  local v="$1" off="$2" seg="$OUT/log-$1-run1.txt"
  sleep 0.5  # the logger writes the last deliveries' lines just after the files arrive
  tail -c +"$((off + 1))" "$EQ_ROOT/log/eqmail.log" > "$seg"
  case "$v" in
    policy)
      grep -m1 -E "$DANE_RE" "$seg" | sed 's/^/policy check: /' | grep . || {
        echo "policy check failed: no 'dane TLS to mx.relay.test [$SINK_IP]: TLSA 3 1 1' line in this run's log ($seg):" >&2
        grep -E 'relay\.test|warning|alert' "$seg" | head -5 >&2; exit 1; }
      echo "policy check: $(grep -cE "$DANE_RE" "$seg") of $N deliveries logged as DANE"
      "$EQCTL" --root "$EQ_ROOT" tlsrpt --json > "$OUT/tlsrpt.json"
      "$EQ_PY" - "$OUT/tlsrpt.json" <<'PYEOF' || { echo "policy check failed: eqmailctl tlsrpt --json has no successful session for relay.test ($OUT/tlsrpt.json)" >&2; exit 1; }
import json, sys
reports = json.load(open(sys.argv[1]))
ok = 0
for r in reports:
    for p in r.get("policies", []):
        pol = p.get("policy", {})
        if pol.get("policy-domain") == "relay.test":
            s = p.get("summary", {})
            ok += s.get("total-successful-session-count", 0)
            print(f"policy check: tlsrpt relay.test policy-type {pol.get('policy-type')}: "
                  f"{s.get('total-successful-session-count')} successful, "
                  f"{s.get('total-failure-session-count')} failed sessions")
sys.exit(0 if ok > 0 else 1)
PYEOF
      ls "$EQ_ROOT/sts" 2>/dev/null | sed 's/^/policy check: MTA-STS cache file: /' ;;
    opportunistic)
      if grep -qE "$POLICY_RE" "$seg"; then
        echo "opportunistic check failed: a policy line in this run's log ($seg):" >&2
        grep -m3 -E "$POLICY_RE" "$seg" >&2; exit 1
      fi
      echo "opportunistic check: no DANE/MTA-STS delivery line in the run's log" ;;
  esac
}

if [ "$WARMUP" -gt 0 ]; then
  echo "== warm-up: $WARMUP messages per variant (not measured; the policy variant's fetches relay.test's MTA-STS policy)"
  for v in "${VARIANTS[@]}"; do
    select_variant "$v"; send "$WARMUP" "warmup-$v" > "$OUT/warmup-$v.json"; set_aside "warmup-$v"
  done
fi

echo "== runs (N=$N, ${SESSIONS} sessions, ${SIZE} B, one connection per message)"
printf '%-14s %3s %9s %10s %9s %10s %6s %6s\n' variant run accept_s accept_m/s e2e_s e2e_m/s errors deliv
: > "$OUT/raw-runs.jsonl"
: > "$OUT/cpu.jsonl"
for run in $(seq "$RUNS"); do
  k=$(( (run - 1) % ${#VARIANTS[@]} ))
  for i in $(seq 0 $(( ${#VARIANTS[@]} - 1 ))); do
    v="${VARIANTS[$(( (i + k) % ${#VARIANTS[@]} ))]}"
    select_variant "$v"
    queue_empty
    off=$(log_size)
    cpu_snapshot > "$OUT/cpu-before"
    line=$(send "$N" "$v")
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
    echo "$line" | "$EQ_PY" -c 'import json,sys; j=json.loads(sys.stdin.read()); print("%-14s %3s %9s %10s %9s %10s %6s %6s" % (j["label"], sys.argv[1], j["accept_s"], j["accept_mps"], j["e2e_s"], j["e2e_mps"], j["errors"], j["delivered"]))' "$run"
    if [ "$run" = 1 ]; then check_variant "$v" "$off" > "$OUT/check-$v.txt"; tee -a "$OUT/env.txt" < "$OUT/check-$v.txt"; fi
    set_aside "run$run-$v"
  done
done

if [ "${PROFILE:-0}" = 1 ]; then
  # unmeasured: one more run per variant with py-spy sampling the remote delivery worker
  # (and the scanner) for its first PROFILE_DUR seconds; summaries by bench/pyspy_top.py
  PYSPY="${PYSPY:-$EQ_VENV/bin/py-spy}"
  [ -x "$PYSPY" ] || { echo "PROFILE=1: py-spy missing ($PYSPY; set PYSPY=)" >&2; exit 1; }
  echo "== profile runs (not measured): py-spy on the remote delivery worker and the scanner"
  for v in "${VARIANTS[@]}"; do
    select_variant "$v"
    queue_empty
    pids=()
    for w in "remote delivery" scanner; do
      pid=$(eq_worker_pid "$w"); tag="${w// /-}"
      "$PYSPY" record --pid "$pid" --duration "${PROFILE_DUR:-8}" --rate 200 --nonblocking --idle --threads \
          --format raw -o "$OUT/profile-$v-$tag.txt" > "$OUT/profile-$v-$tag.log" 2>&1 &
      pids+=($!)
    done
    sleep 0.5
    send "$N" "profile-$v" > "$OUT/profile-$v.json"
    wait "${pids[@]}" || true
    set_aside "profile-$v"
    for w in "remote delivery" scanner; do
      tag="${w// /-}"
      [ -s "$OUT/profile-$v-$tag.txt" ] && "$EQ_PY" "$BENCH_HERE/pyspy_top.py" "$OUT/profile-$v-$tag.txt" \
          --title "$v: $w" --top "${TOP:-15}" > "$OUT/profile-$v-$tag.md"
    done
    echo "profile $v: $OUT/profile-$v-*.md"
  done
fi
set_policy 0

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
desc = {"opportunistic": "opportunistic (dnssec 0, mtasts 0)",
        "policy": "policy (dnssec 1 + DANE, mtasts 1, cached)"}
stat = {}
for lab in dict.fromkeys(r["label"] for r in runs):
    g = [r for r in runs if r["label"] == lab]
    stat[lab] = {"accept_mps": med([r["accept_mps"] for r in g]),
                 "e2e_mps": med([r["e2e_mps"] for r in g if r["e2e_mps"]]),
                 "accept_runs": [r["accept_mps"] for r in g],
                 "e2e_runs": [r["e2e_mps"] for r in g],
                 "ok": sum(1 for r in g if r["errors"] == 0 and r["e2e_mps"])}
base = stat.get("opportunistic", {})
print("| variant | accept msg/s (median; runs) | accept vs opportunistic | e2e msg/s (median; runs) | **e2e vs opportunistic** | ok runs |")
print("|---|---:|---:|---:|---:|---|")
rows = []
for lab, s in stat.items():
    ra = s["accept_mps"] / base["accept_mps"] if base.get("accept_mps") else None
    re_ = s["e2e_mps"] / base["e2e_mps"] if s["e2e_mps"] and base.get("e2e_mps") else None
    rows.append({"variant": lab, **s, "accept_vs_opportunistic": ra, "e2e_vs_opportunistic": re_})
    print(f"| {desc.get(lab, lab)} | {f(s['accept_mps'])} ({', '.join(f(x) for x in s['accept_runs'])}) "
          f"| {f(ra, 2)}× | {f(s['e2e_mps'])} ({', '.join(f(x) for x in s['e2e_runs'])}) "
          f"| **{f(re_, 2)}×** | {s['ok']}/{len(s['accept_runs'])} |")
print("\nTarget (issue 17): policy >= 0.9x of opportunistic (relay throughput, e2e to the sink).")
cpu = [json.loads(l) for l in open(os.path.join(d, "cpu.jsonl")) if l.strip()]
names = sorted({k for c in cpu for k in c["cpu_ms_per_msg"]})
if cpu:
    print("\nCPU ms per message of each process (median over runs):\n")
    print("| process | " + " | ".join(stat) + " |")
    print("|---|" + "---:|" * len(stat))
    tot = {lab: 0.0 for lab in stat}
    for nm in names:
        vals = []
        for lab in stat:
            m = med([c["cpu_ms_per_msg"].get(nm, 0) for c in cpu if c["variant"] == lab])
            tot[lab] += m or 0
            vals.append(f(m, 2))
        print(f"| {nm} | " + " | ".join(vals) + " |")
    print("| **sum** | " + " | ".join(f(tot[lab], 2) for lab in stat) + " |")
json.dump({"tool": "eqmail-bench-tlspolicy", "variants": rows}, open(os.path.join(d, "summary.json"), "w"), indent=1)
EOF
