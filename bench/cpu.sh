#!/usr/bin/env bash
# Where eqmail's CPU goes, per message and per process, under one smtp-source burst.
#
#   bench/cpu.sh                      # 3000 x 5 KB, 10 sessions, after a warm-up burst
#   N=2000 CONC=50 bench/cpu.sh
#
# Sets up and starts the bench instance (bench/lib.sh), sends a warm-up burst, then
# reads utime/stime of every eqmail process (/proc/PID/stat) and the machine's
# /proc/stat before and after a burst of N messages until all N are in Maildir/new, and
# prints CPU milliseconds per message for each worker kind (local delivery children
# summed), split into user and system time.  Maildir files are NOT deleted between
# bursts: on this no-journal ext4 every recently freed inode slows later allocations
# (see README.md, "Settle after a deletion"), which would blur the comparison.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
need_root
N="${N:-3000}"; CONC="${CONC:-10}"; SIZE="${SIZE:-5120}"; WARMUP="${WARMUP:-1000}"
cleanup() { eq_stop; }
trap cleanup EXIT
eq_setup
eq_start
settle_after_delete
burst() {  # messages
  local n0; n0=$(find "$EQ_MAILDIR_NEW" -type f | wc -l)
  /usr/sbin/smtp-source -s "$CONC" -m "$1" -l "$SIZE" -f s@bench.test -t "$EQ_TO" "$EQ_ADDR:$EQ_PORT"
  ACCEPTED=$(date +%s.%N)
  while [ "$(find "$EQ_MAILDIR_NEW" -type f | wc -l)" -lt $((n0 + $1)) ]; do sleep 0.02; done
}
snap() {
  local p
  for p in $(eq_pids); do
    [ -r "/proc/$p/stat" ] || continue
    echo "$p $(awk '{print $14+$16, $15+$17}' "/proc/$p/stat" 2>/dev/null) $(tr '\0' ' ' < "/proc/$p/cmdline" | cut -c1-60)"
  done
}
[ "$WARMUP" -gt 0 ] && burst "$WARMUP"
before=$(snap); s0=$(head -1 /proc/stat); t0=$(date +%s.%N)
burst "$N"
t2=$(date +%s.%N); s1=$(head -1 /proc/stat); after=$(snap)
"$PY" - "$N" "$t0" "$ACCEPTED" "$t2" "$s0" "$s1" "$before" "$after" <<'PY'
import sys
n = int(sys.argv[1]); t0, t1, t2 = map(float, sys.argv[2:5])
s0 = [int(x) for x in sys.argv[5].split()[1:]]; s1 = [int(x) for x in sys.argv[6].split()[1:]]
d = [b - a for a, b in zip(s0, s1)]; total = sum(d); idle = d[3] + d[4]
hz = 100  # USER_HZ
print(f"N={n}: accept {n / (t1 - t0):.0f} msg/s, end to end {n / (t2 - t0):.0f} msg/s; "
      f"machine {100 * (total - idle) / total:.0f}% busy, {100 * d[2] / total:.0f}% system; "
      f"{(total - idle) * 1000 / hz / n:.2f} CPU ms/msg in all")
def parse(text):
    out = {}
    for line in text.splitlines():
        pid, u, s, *cmd = line.split()
        out[pid] = (int(u), int(s), " ".join(cmd))
    return out
b, a = parse(sys.argv[7]), parse(sys.argv[8])
agg = {}
for pid, (u, s, cmd) in a.items():
    bu, bs, _ = b.get(pid, (0, 0, ""))
    if "local delivery for" in cmd:
        cmd = "local delivery children (sum)"
    x = agg.setdefault(cmd, [0, 0]); x[0] += u - bu; x[1] += s - bs
for cmd, (u, s) in sorted(agg.items(), key=lambda kv: -sum(kv[1])):
    if u + s:
        print(f"{(u + s) * 1000 / hz / n:6.3f} ms/msg  (user {u * 1000 / hz / n:.3f}, system {s * 1000 / hz / n:.3f})  {cmd}")
PY
