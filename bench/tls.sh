#!/usr/bin/env bash
# TLS session set-up cost, eqmail vs Postfix: STARTTLS handshakes per second and whole
# SMTP sessions with STARTTLS per second, closed loop at CONC (10) sessions.
#
#   bench/tls.sh                       # MODES=handshake,session,plain RUNS=3 DURATION=10
#   MODES=handshake RUNS=1 bench/tls.sh
#
# Both servers use the SAME certificate and key: the one `eqmailctl setup` writes to
# eqmail's control/servercert.pem (self-signed, ECDSA P-256, key + certificate in one
# file), copied (key first) to $BENCH_STATE/tls/ for the private Postfix, which gets (postconf -e on
# its own main.cf only; nothing shared is changed):
#   smtpd_tls_security_level = may, smtpd_tls_chain_files = <that copy>
# Everything else is each server's TLS default (protocol, cipher and key exchange are
# recorded per run).  The client (bench/tls_client.py) does a full handshake every time
# (no session resumption) and one TCP connection per session:
#   handshake  banner, EHLO, STARTTLS, handshake, EHLO, QUIT
#   session    the same + MAIL, RCPT, DATA of SIZE (5 KB) bytes, 250, QUIT
#   plain      the session without STARTTLS (reference: what TLS costs on top)
# Runs are interleaved (mode by mode, Postfix and eqmail alternating, order flipped
# every run); between runs both queues are left to drain.  Also reported: CPU seconds
# of each server's process tree per session (Postfix: master + smtpd/cleanup/... incl.
# reaped children; eqmail: supervisor + workers; in session mode this includes queueing
# and delivering the message) and of the client.
# Raw JSON: $BENCH_STATE/results/<stamp>-tls/.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
need_root
MODES="${MODES:-handshake,session,plain}"
RUNS="${RUNS:-3}"
DURATION="${DURATION:-10}"
CONC="${CONC:-10}"
SIZE="${SIZE:-5120}"
OUT="${OUT:-$BENCH_STATE/results/$(date -u +%Y%m%dT%H%M%SZ)-tls}"
mkdir -p "$OUT"
cleanup() { eq_stop; pf_stop; }
trap cleanup EXIT

echo "== setup (results -> $OUT)"
pf_setup
eq_setup
[ -f "$EQ_ROOT/control/servercert.pem" ] || "$EQCTL" --root "$EQ_ROOT" cert renew >/dev/null
mkdir -p "$BENCH_STATE/tls"
# Postfix's chain file wants the key first (qmail's servercert.pem has the certificate first)
( umask 077
  { openssl pkey -in "$EQ_ROOT/control/servercert.pem"; openssl x509 -in "$EQ_ROOT/control/servercert.pem"; } \
      > "$BENCH_STATE/tls/servercert.pem" )
postconf -c "$PF_CONF" -e "smtpd_tls_security_level = may" \
    "smtpd_tls_chain_files = $BENCH_STATE/tls/servercert.pem" "smtpd_tls_loglevel = 0"
postfix -c "$PF_CONF" check
{ machine_info
  echo "MODES=$MODES RUNS=$RUNS DURATION=$DURATION CONC=$CONC SIZE=$SIZE"
  echo "eqmail listen: $(cat "$EQ_ROOT/control/listen")"
  echo "certificate: $(openssl x509 -in "$BENCH_STATE/tls/servercert.pem" -noout -subject) $(openssl x509 -in "$BENCH_STATE/tls/servercert.pem" -noout -text | grep -m1 -E 'Public Key Algorithm|NIST CURVE' | sed 's/^ *//')"
  echo "postfix TLS: $(postconf -c "$PF_CONF" -h smtpd_tls_security_level smtpd_tls_chain_files | paste -sd' ')"
  echo "openssl: $(openssl version)"
} | tee "$OUT/env.txt"
pf_start
eq_start
wait_quiet | tee -a "$OUT/env.txt"
settle_after_delete | tee -a "$OUT/env.txt"
pf_master=$(head -1 "$PF_QUEUE/pid/master.pid" | tr -d ' ')
eq_sup=$(cat "$EQ_ROOT/run/eqmail.pid")

drain() {  # wait (up to 60 s) until both queues are empty: no backlog carried into the next run
  for _ in $(seq 600); do
    local n
    n=$(( $(find "$EQ_ROOT/queue/mess" -type f | wc -l) + $(find "$PF_QUEUE"/{incoming,active,deferred} -type f 2>/dev/null | wc -l) ))
    [ "$n" = 0 ] && return 0
    sleep 0.1
  done
  echo "queues not empty after 60 s" >&2
}

one() {  # label port root-pid mode run
  "$EQ_PY" "$BENCH_HERE/tls_client.py" --port "$2" --root-pid "$3" --mode "$4" --conc "$CONC" --run "$5" \
      --duration "$DURATION" --size "$SIZE" --to "$([ "$1" = postfix ] && echo "$PF_TO" || echo "$EQ_TO")" --label "$1" \
      >> "$OUT/raw-runs.jsonl" 2> >(tee -a "$OUT/runs.txt" >&2) || true
}

echo "== runs (CONC=$CONC, $DURATION s each)"
IFS=, read -ra MODE_LIST <<< "$MODES"
for run in $(seq "$RUNS"); do
  for mode in "${MODE_LIST[@]}"; do
    if [ $((run % 2)) = 1 ]; then order="postfix eqmail"; else order="eqmail postfix"; fi
    for t in $order; do
      drain
      if [ "$t" = postfix ]; then one postfix "$POSTFIX_PORT" "$pf_master" "$mode" "$run"
      else one eqmail "$EQ_PORT" "$eq_sup" "$mode" "$run"; fi
    done
  done
done
drain
echo "load after: $(cut -d" " -f1-3 /proc/loadavg)" | tee -a "$OUT/env.txt"
cp "$EQ_ROOT/log/eqmail.log" "$OUT/eqmail.log" 2>/dev/null || true
cp "$PF_LOG" "$OUT/postfix.log" 2>/dev/null || true
bad=$(grep -c -E 'warning|alert|error|Traceback|crashed|exited|restart' "$OUT/eqmail.log" || true)
echo "eqmail log lines with warning/alert/error/Traceback/restart: $bad" | tee "$OUT/eqmail-after.txt"
grep -E 'warning|alert|error|Traceback|crashed|exited|restart' "$OUT/eqmail.log" | head -10 | tee -a "$OUT/eqmail-after.txt" || true

"$EQ_PY" - "$OUT" <<'EOF' | tee "$OUT/table.md"
import json, os, statistics, sys
d = sys.argv[1]
runs = [json.loads(l) for l in open(os.path.join(d, "raw-runs.jsonl")) if l.strip()]
med = lambda xs: statistics.median(xs) if xs else None
f = lambda x, nd=0: "-" if x is None else f"{x:,.{nd}f}"
modes = []
for r in runs:
    if r["mode"] not in modes:
        modes.append(r["mode"])
print("| mode | Postfix sessions/s | eqmail sessions/s | **ratio eq/pf** | per-run ratios | handshake median ms (pf / eq) "
      "| server CPU ms/session (pf / eq) | client CPU ms/session (pf / eq) | errors (pf / eq) | protocol, cipher (pf / eq) |")
print("|---|---:|---:|---:|---|---:|---:|---:|---:|---|")
rows = []
for m in modes:
    g = {t: [r for r in runs if r["mode"] == m and r["label"] == t] for t in ("postfix", "eqmail")}
    s = {t: med([r["sessions_per_s"] for r in g[t]]) for t in g}
    hs = {t: med([r["handshake_ms"]["median"] for r in g[t] if r["handshake_ms"]["median"] is not None]) for t in g}
    cpu = {t: med([r["server_cpu_ms_per_session"] for r in g[t] if r["server_cpu_ms_per_session"] is not None]) for t in g}
    ccpu = {t: med([r["client_cpu_ms_per_session"] for r in g[t] if r["client_cpu_ms_per_session"] is not None]) for t in g}
    err = {t: sum(r["errors"] for r in g[t]) for t in g}
    ciph = {t: ", ".join(sorted({c for r in g[t] for c in r["ciphers"]})) or "-" for t in g}
    ratio = s["eqmail"] / s["postfix"] if s["eqmail"] and s["postfix"] else None
    # per-run ratios (the two targets ran back to back): less exposed to drift on a shared box
    pairs = {r["run"]: r["sessions_per_s"] for r in g["postfix"]}
    per_run = [round(r["sessions_per_s"] / pairs[r["run"]], 2) for r in g["eqmail"] if pairs.get(r["run"])]
    rows.append({"mode": m, "postfix_sps": s["postfix"], "eqmail_sps": s["eqmail"], "ratio": ratio,
                 "handshake_ms": hs, "server_cpu_ms": cpu, "client_cpu_ms": ccpu, "errors": err, "ciphers": ciph,
                 "runs": {t: len(g[t]) for t in g}, "per_run_ratios": per_run})
    print(f"| {m} | {f(s['postfix'])} | {f(s['eqmail'])} | **{f(ratio, 2)}×** | {' '.join(map(str, per_run))} | {f(hs['postfix'], 1)} / {f(hs['eqmail'], 1)} "
          f"| {f(cpu['postfix'], 2)} / {f(cpu['eqmail'], 2)} | {f(ccpu['postfix'], 2)} / {f(ccpu['eqmail'], 2)} "
          f"| {err['postfix']} / {err['eqmail']} | {ciph['postfix']} / {ciph['eqmail']} |")
json.dump({"tool": "eqmail-bench-tls", "modes": rows}, open(os.path.join(d, "summary.json"), "w"), indent=1)
EOF
