#!/usr/bin/env bash
# Memory with K idle SMTP sessions open (default 1000), eqmail vs Postfix.
#
#   bench/idle.sh                 # K=1000
#   K=500 bench/idle.sh
#
# Both servers are configured to serve K+100 concurrent sessions (eqmail: listen
# concurrency=; Postfix: default_process_limit=, set with postconf in the private
# instance's main.cf only for this benchmark).  Each session reads the banner, says EHLO
# and stays idle.  Reported: sum of RSS and of PSS over every process of the server
# tree (eqmail supervisor + workers; Postfix master + children), before and with the
# sessions open.  PSS is the honest sum for forked processes (shared pages counted
# once); RSS is what `ps` shows.  Raw JSON: $BENCH_STATE/results/<stamp>-idle/.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
need_root
K="${K:-1000}"
OUT="${OUT:-$BENCH_STATE/results/$(date -u +%Y%m%dT%H%M%SZ)-idle}"
mkdir -p "$OUT"
cleanup() { eq_stop; pf_stop; }
trap cleanup EXIT

pf_setup
postconf -c "$PF_CONF" -e "default_process_limit = $((K + 100))"
EQ_CONCURRENCY=$((K + 100)) eq_setup
{ machine_info; echo "K=$K"; } > "$OUT/env.txt"

wait_quiet | tee -a "$OUT/env.txt"
echo "== Postfix: $K idle sessions"
pf_start
sleep 1
pf_master=$(head -1 "$PF_QUEUE/pid/master.pid" | tr -d ' ')
"$PY" "$BENCH_HERE/idle_conns.py" --port "$POSTFIX_PORT" --root-pid "$pf_master" --sessions "$K" --label postfix \
    | tee "$OUT/postfix.json"
pf_stop

echo "== eqmail: $K idle sessions"
EQ_CONCURRENCY=$((K + 100)) eq_start
sleep 1
eq_sup=$(cat "$EQ_ROOT/run/eqmail.pid")
"$PY" "$BENCH_HERE/idle_conns.py" --port "$EQ_PORT" --root-pid "$eq_sup" --sessions "$K" --label eqmail \
    | tee "$OUT/eqmail.json"
cp "$EQ_ROOT/log/eqmail.log" "$OUT/eqmail.log" 2>/dev/null || true
eq_stop

"$PY" - "$OUT" <<'EOF' | tee "$OUT/table.md"
import json, sys, os
d = sys.argv[1]
pf = json.load(open(os.path.join(d, "postfix.json")))
eq = json.load(open(os.path.join(d, "eqmail.json")))
mib = lambda k: k / 1024
print("| server | sessions ready | processes | RSS before | RSS with sessions | PSS before | PSS with sessions | PSS per session |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for name, j in (("Postfix", pf), ("eqmail", eq)):
    b, l = j["baseline"], j["loaded"]
    print(f"| {name} | {j['sessions_ready']}/{j['sessions_requested']} | {l['processes']} | {mib(b['rss_kib']):.0f} MiB | "
          f"{mib(l['rss_kib']):.0f} MiB | {mib(b['pss_kib']):.0f} MiB | {mib(l['pss_kib']):.0f} MiB | {j['delta_pss_kib_per_session']:.0f} KiB |")
r = lambda k: eq["loaded"][k] / pf["loaded"][k] if pf["loaded"][k] else float("nan")
print(f"\neqmail/Postfix memory with sessions open: RSS {r('rss_kib'):.2f}x, PSS {r('pss_kib'):.2f}x (lower is better)")
EOF
