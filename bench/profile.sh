#!/usr/bin/env bash
# py-spy profile of every eqmail worker under the acceptance load.
#
#   bench/profile.sh                  # 5 KB x 10 sessions, N=6000
#   CONC=50 N=6000 bench/profile.sh
#   SPP_CONF=bench/smtpplugins-inproc3 bench/profile.sh   # with plugins (+ the sandbox worker)
#
# Starts a fresh instance, sends one warm-up message (so the local delivery child for
# the bench user exists), then runs smtp-source (one connection per message) while
# `py-spy record --nonblocking --idle --format raw` samples the listener, the queue
# writer, the scanner, the local delivery spawner and its delivery child at RATE_HZ.
# Writes collapsed stacks per worker and a hot-spot summary (bench/pyspy_top.py) to
# $BENCH_STATE/results/<stamp>-profile/.  Needs py-spy in the venv (pip install py-spy).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
need_root
N="${N:-6000}"
CONC="${CONC:-10}"
SIZE="${SIZE:-5120}"
DUR="${DUR:-10}"
RATE_HZ="${RATE_HZ:-200}"
PYSPY="${PYSPY:-$EQ_VENV/bin/py-spy}"
OUT="${OUT:-$BENCH_STATE/results/$(date -u +%Y%m%dT%H%M%SZ)-profile}"
mkdir -p "$OUT"
[ -x "$PYSPY" ] || { echo "py-spy missing: $EQ_VENV/bin/pip install py-spy" >&2; exit 1; }
cleanup() { eq_stop; }
trap cleanup EXIT

eq_setup
# SPP_CONF=FILE: install FILE as control/smtpplugins (e.g. one written by bench/plugins.sh;
# @EQ_PLUGINS@ in it is replaced by the measured code's shipped plugins directory)
if [ -n "${SPP_CONF:-}" ]; then
  sed "s#@EQ_PLUGINS@#$EQ_PLUGINS#g" "$SPP_CONF" > "$EQ_ROOT/control/smtpplugins"; chmod 644 "$EQ_ROOT/control/smtpplugins"
fi
{ machine_info; echo "N=$N CONC=$CONC SIZE=$SIZE DUR=$DUR RATE_HZ=$RATE_HZ SPP_CONF=${SPP_CONF:-}"; } > "$OUT/env.txt"
eq_start
/usr/sbin/smtp-source -s 1 -m 1 -l 1000 -f s@bench.test -t "$EQ_TO" "$EQ_ADDR:$EQ_PORT"
for _ in $(seq 50); do [ -n "$(ls -A "$EQ_MAILDIR_NEW")" ] && break; sleep 0.1; done

declare -A PIDS
PIDS[listener]=$(eq_worker_pid listener)
PIDS[queuewriter]=$(eq_worker_pid "queue writer")
PIDS[scanner]=$(eq_worker_pid scanner)
PIDS[local]=$(eq_worker_pid "local delivery")
PIDS[sandbox]=$(eq_worker_pid "plugin sandbox")  # idle without control/smtpplugins
for k in "${!PIDS[@]}"; do echo "$k ${PIDS[$k]}"; done | tee "$OUT/pids.txt"

/usr/sbin/smtp-source -s "$CONC" -m "$N" -l "$SIZE" -f s@bench.test -t "$EQ_TO" "$EQ_ADDR:$EQ_PORT" &
SRC=$!
sleep 1  # past the ramp-up
SPY=()
for k in "${!PIDS[@]}"; do
  [ -n "${PIDS[$k]}" ] || continue
  "$PYSPY" record --pid "${PIDS[$k]}" --duration "$DUR" --rate "$RATE_HZ" --nonblocking --idle --threads $([ "$k" = local ] && echo --subprocesses) \
      --format raw -o "$OUT/$k.txt" > "$OUT/$k.pyspy.log" 2>&1 &
  SPY+=($!)
done
( head -1 /proc/stat; sleep "$DUR"; head -1 /proc/stat ) > "$OUT/cpu.txt" &
for p in "${SPY[@]}"; do wait "$p" || true; done
wait "$SRC" || echo "smtp-source exited non-zero"
cp "$EQ_ROOT/log/eqmail.log" "$OUT/eqmail.log"
for k in listener queuewriter scanner local sandbox; do
  [ -s "$OUT/$k.txt" ] && "$EQ_PY" "$BENCH_HERE/pyspy_top.py" "$OUT/$k.txt" --title "$k (pid ${PIDS[$k]})" --top "${TOP:-15}"
done | tee "$OUT/summary.md"
