# Shared helpers for eqmail's benchmarks (sourced by bench/*.sh).
#
# Everything mutable lives under $BENCH_STATE (default /var/tmp/eqmail-bench), which is
# also handed to the shared harness (../shared/bench), so its private Postfix instance,
# its "mbench" user's home and our eqmail instance all live on the same filesystem.
# Needs root (Postfix, system users, privilege-separated eqmail).

BENCH_HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PROJECT="$(cd "$BENCH_HERE/.." && pwd)"
SHARED_BENCH="${SHARED_BENCH:-$(cd "$PROJECT/../shared/bench" 2>/dev/null && pwd || echo /work/shared/bench)}"
export BENCH_STATE="${BENCH_STATE:-/var/tmp/eqmail-bench}"
# Not the harness's default 2525: a default eqmail instance (tests, `make run`) listens there.
export POSTFIX_PORT="${POSTFIX_PORT:-2725}"
# the shared harness reads these from the environment
. "$SHARED_BENCH/common.sh"

EQ_VENV="${EQ_VENV:-/opt/eqmail/venv}"
EQ_PY="$EQ_VENV/bin/python"
EQCTL="$EQ_VENV/bin/eqmailctl"
EQ_ROOT="${EQ_ROOT:-$BENCH_STATE/eqmail}"
EQ_ADDR=127.0.0.1
EQ_PORT="${EQ_PORT:-2726}"
EQ_USER="${EQ_USER:-eqbench}"          # system user owning the eqmail test Maildir
EQ_LOCAL="${EQ_LOCAL:-mbench}"         # local part mapped to $EQ_USER by users/assign
EQ_DOMAIN="${EQ_DOMAIN:-bench.test}"
EQ_HOME="$EQ_ROOT/home/$EQ_USER"
EQ_MAILDIR_NEW="$EQ_HOME/Maildir/new"
EQ_CONCURRENCY="${EQ_CONCURRENCY:-100}"  # tcpserver -c; Postfix's default_process_limit is 100 too
EQ_PROCESSES="${EQ_PROCESSES:-}"         # listener processes=N (empty: eqmail's default)
PF_TO="$BENCH_USER@$BENCH_DOMAIN"

# Which eqmail code runs: EQ_REV=worktree (default) is the checkout as it is (the venv's
# editable install); EQ_REV=<git rev> (e.g. HEAD) runs a `git archive` snapshot of eqmail/
# at that revision from $BENCH_STATE/src-<sha> via PYTHONPATH (useful while the work tree
# is mid-edit; no git state is changed).
EQ_REV="${EQ_REV:-worktree}"
if [ "$EQ_REV" != worktree ]; then
  _sha=$(git -C "$PROJECT" rev-parse --short "$EQ_REV")
  EQ_SRC="$BENCH_STATE/src-$_sha"
  if [ ! -f "$EQ_SRC/eqmail/__init__.py" ]; then
    rm -rf "$EQ_SRC.tmp"; mkdir -p "$EQ_SRC.tmp"
    git -C "$PROJECT" archive "$_sha" eqmail | tar -x -C "$EQ_SRC.tmp"
    mv "$EQ_SRC.tmp" "$EQ_SRC"
  fi
  # the shipped qmail-spp plugins: the sandbox runs a plugin in-process only when it is a
  # file directly in <package checkout>/plugins, i.e. $EQ_SRC/plugins for a snapshot
  if [ ! -d "$EQ_SRC/plugins" ] && git -C "$PROJECT" cat-file -e "$_sha:plugins" 2>/dev/null; then
    rm -rf "$EQ_SRC/plugins.tmp"; mkdir -p "$EQ_SRC/plugins.tmp"
    git -C "$PROJECT" archive "$_sha" plugins | tar -x -C "$EQ_SRC/plugins.tmp"
    mv "$EQ_SRC/plugins.tmp/plugins" "$EQ_SRC/plugins"; rmdir "$EQ_SRC/plugins.tmp"
  fi
  chmod -R a+rX "$EQ_SRC"
  export PYTHONPATH="$EQ_SRC${PYTHONPATH:+:$PYTHONPATH}"
  EQ_REV_DESC="$_sha (git archive snapshot in $EQ_SRC)"
else
  EQ_REV_DESC="work tree $(git -C "$PROJECT" rev-parse --short HEAD 2>/dev/null) + $(git -C "$PROJECT" status --porcelain -- eqmail 2>/dev/null | wc -l) changed/new paths in eqmail/"
fi
EQ_TO="$EQ_LOCAL@$EQ_DOMAIN"
# the shipped plugins the measured code runs in-process (bench/plugins.sh)
if [ "$EQ_REV" != worktree ]; then EQ_PLUGINS="$EQ_SRC/plugins"; else EQ_PLUGINS="$PROJECT/plugins"; fi

need_root() { [ "$(id -u)" = 0 ] || { echo "must run as root" >&2; exit 1; }; }

# A fresh eqmail instance: control/, queue/, users/assign mapping $EQ_LOCAL to a system
# user whose ~/Maildir/ is the delivery directory (eqmail's default delivery ./Maildir/).
# The previous instance's queue/ and home/ are kept when its queue is empty (as every
# benchmark leaves it), like Postfix's queue, which the harness keeps too: deleting the
# thousands of files they hold would slow both servers for minutes (settle_after_delete).
# Everything else (control/, users/, log/, run/) is made afresh.  EQ_FRESH=1 deletes all.
eq_setup() {
  need_root
  if [ -f "$EQ_ROOT/run/eqmail.pid" ]; then "$EQCTL" --root "$EQ_ROOT" stop >/dev/null 2>&1 || true; fi
  if [ -e "$EQ_ROOT" ]; then
    if [ "${EQ_FRESH:-0}" != 1 ] && [ -d "$EQ_ROOT/queue/mess" ] \
        && [ -z "$(find "$EQ_ROOT/queue/mess" "$EQ_ROOT/queue/todo" "$EQ_ROOT/queue/info" -type f -print -quit)" ]; then
      find "$EQ_ROOT" -mindepth 1 -maxdepth 1 ! -name queue ! -name home -exec rm -rf {} +
      find "$EQ_HOME/Maildir/new" "$EQ_HOME/Maildir/cur" "$EQ_HOME/Maildir/tmp" -type f -delete 2>/dev/null || true
    else
      rm -rf "$EQ_ROOT"
      sync
      date +%s > "$BENCH_STATE/.deleted-at"  # see settle_after_delete
    fi
  fi
  mkdir -p "$EQ_ROOT"; chmod 755 "$BENCH_STATE" "$EQ_ROOT"
  if ! id "$EQ_USER" >/dev/null 2>&1; then
    useradd --system --user-group --no-create-home --home-dir "$EQ_HOME" --shell /usr/sbin/nologin "$EQ_USER"
  fi
  local uid gid
  uid=$(id -u "$EQ_USER"); gid=$(id -g "$EQ_USER")
  mkdir -p "$EQ_HOME/Maildir"/{new,cur,tmp}
  chmod 755 "$EQ_ROOT/home" "$EQ_HOME"
  chown -R "$EQ_USER:$EQ_USER" "$EQ_HOME"
  "$EQCTL" --root "$EQ_ROOT" setup --me "$EQ_DOMAIN" >/dev/null
  local opts="concurrency=$EQ_CONCURRENCY"
  [ -n "$EQ_PROCESSES" ] && opts="$opts processes=$EQ_PROCESSES"
  echo "smtp $EQ_ADDR:$EQ_PORT $opts" > "$EQ_ROOT/control/listen"
  echo '127.:allow,RELAYCLIENT=""' > "$EQ_ROOT/control/tcp.smtp"
  # every bench client is 127.0.0.1: like Postfix, whose per-client connection limit
  # exempts $mynetworks by default, the relay clients get no per-client limit
  echo 0 > "$EQ_ROOT/control/concurrencyperclientrelay"
  printf '=%s:%s:%s:%s:%s:::\n.\n' "$EQ_LOCAL" "$EQ_USER" "$uid" "$gid" "$EQ_HOME" > "$EQ_ROOT/users/assign"
  # EQ_CONTROLS="name=value ..." writes extra one-line control files (experiments, e.g.
  # EQ_CONTROLS=concurrencylocal=50); empty by default: eqmail's defaults are measured
  local kv
  for kv in ${EQ_CONTROLS:-}; do echo "${kv#*=}" > "$EQ_ROOT/control/${kv%%=*}"; done
}

eq_start() {
  port_free "$EQ_PORT"
  "$EQCTL" --root "$EQ_ROOT" start
  for _ in $(seq 50); do
    (exec 3<>"/dev/tcp/$EQ_ADDR/$EQ_PORT") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "eqmail did not start listening on $EQ_ADDR:$EQ_PORT; see $EQ_ROOT/log/eqmail.log" >&2
  return 1
}

eq_stop() {
  [ -f "$EQ_ROOT/run/eqmail.pid" ] && "$EQCTL" --root "$EQ_ROOT" stop >/dev/null 2>&1 || true
}

# pids of the running eqmail tree (supervisor + its descendants)
eq_pids() {
  local sup
  sup=$(cat "$EQ_ROOT/run/eqmail.pid" 2>/dev/null) || return 0
  [ -d "/proc/$sup" ] || return 0
  echo "$sup"
  pgrep -P "$sup" | while read -r p; do echo "$p"; pgrep -P "$p"; done
}

eq_worker_pid() {  # title substring, e.g. "listener", "queue writer", "scanner", "local delivery"
  "$EQCTL" --root "$EQ_ROOT" status --json | "$EQ_PY" -c '
import json, sys
want = sys.argv[1]
for w in json.load(sys.stdin)["workers"]:
    if want in w["name"]:
        print(w["pid"]); break' "$1"
}

pf_setup() { "$SHARED_BENCH/postfix_bench.sh" setup >/dev/null; }
port_free() {  # fail early with a clear message when someone else holds a port
  if ss -Hltn "sport = :$1" | grep -q .; then
    echo "port $1 is in use on this machine:" >&2; ss -Hltnp "sport = :$1" >&2; return 1
  fi
}
pf_start() { port_free "$POSTFIX_PORT"; "$SHARED_BENCH/postfix_bench.sh" start >/dev/null; }
pf_stop()  { "$SHARED_BENCH/postfix_bench.sh" stop >/dev/null 2>&1 || true; }

# QUIET_WAIT=S: wait up to S seconds until the 1-minute load average is below QUIET_LOAD
# (default 1.5) before measuring -- this VM is shared, other work skews the numbers.
wait_quiet() {
  local s="${QUIET_WAIT:-0}" lim="${QUIET_LOAD:-1.5}" t=0
  while [ "$t" -lt "$s" ] && awk -v l="$lim" '{exit !($1 >= l)}' /proc/loadavg; do sleep 5; t=$((t + 5)); done
  echo "load when starting: $(cut -d' ' -f1-3 /proc/loadavg) (waited ${t}s)"
}

machine_info() {
  echo "date_utc: $(date -u +%FT%TZ)"
  echo "kernel: $(uname -r)"
  echo "cpus: $(nproc) ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'))"
  echo "mem: $(free -m | awk '/Mem:/{print $2" MiB"}')"
  echo "queue fs (findmnt -T $BENCH_STATE): $(findmnt -no SOURCE,FSTYPE,OPTIONS -T "$BENCH_STATE")"
  local dev; dev=$(basename "$(findmnt -no SOURCE -T "$BENCH_STATE")")
  if [ -d "/proc/fs/ext4/$dev" ]; then
    if [ -d "/proc/fs/jbd2/$dev-8" ] || ls -d /proc/fs/jbd2/"$dev"-* >/dev/null 2>&1; then
      echo "ext4 journal: yes (/proc/fs/jbd2/$dev-*)"
    else
      echo "ext4 journal: NONE (no /proc/fs/jbd2/$dev-* entry)"
    fi
  fi
  echo "postfix: $(postconf -d -h mail_version 2>/dev/null)"
  echo "python: $("$EQ_PY" -V 2>&1) ($EQ_PY)"
  echo "eqmail code: $EQ_REV_DESC"
  echo "eqmail extra controls (EQ_CONTROLS): ${EQ_CONTROLS:-none}"
  echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
}

# ext4 without a journal (this VM's root filesystem) skips inodes freed in the last
# 60 s (300 s while their inode-table block is still dirty) when it allocates a new one,
# one lookup each (recently_deleted() in fs/ext4/ialloc.c), and both servers' queues
# and Maildirs share the same block groups.  Deleting the previous instance (tens of
# thousands of files) would therefore slow every file creation of BOTH servers for the
# next minute, and by how much would depend on how big that instance was.  So measure
# only once the deletion is out of that window (it was followed by sync, so 60 s).
settle_after_delete() {
  local settle="${SETTLE:-65}" at now
  [ -f "$BENCH_STATE/.deleted-at" ] || return 0
  at=$(cat "$BENCH_STATE/.deleted-at"); now=$(date +%s)
  if [ $((now - at)) -lt "$settle" ]; then
    echo "settle: waiting $((settle - (now - at)))s after deleting the previous instance (SETTLE=$settle)"
    sleep $((settle - (now - at)))
  fi
}
