#!/usr/bin/env bash
# Install everything eqmail and its tests need on a fresh Debian machine, idempotently.
#   - Debian packages (as root): python3-venv, swaks, openssl, iproute2, man-db and
#     groff-base (the tests render the man pages with man -l), daemontools (tai64nlocal)
#     and logrotate for the log tests, libmail-dkim-perl, opendkim and opendkim-tools
#     (the DKIM interop tests: implementations nobody here wrote), srs (Mail::SRS's
#     command, by the author of SRS: the SRS interop test), unbound (a validating
#     resolver), nsd (an authoritative server) and ldnsutils (ldns-keygen,
#     ldns-signzone): the DNSSEC/DANE tests sign their own zones and serve them;
#     haproxy (the PROXY protocol tests put a private one in front of a listener)
#   - a virtualenv built from Debian's /usr/bin/python3 (never pyenv's: the dropped
#     worker users must be able to read the interpreter), at /opt/eqmail/venv as root
#     or ./.venv otherwise, with eqmail and its test dependencies installed.
# Prints the venv path on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."
here=$(pwd)

if [ "$(id -u)" = 0 ]; then
  venv=${EQMAIL_VENV:-/opt/eqmail/venv}
  need=()
  for pkg in python3-venv swaks openssl iproute2 procps util-linux man-db groff-base daemontools logrotate \
             libmail-dkim-perl opendkim opendkim-tools srs unbound nsd ldnsutils haproxy; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
  done
  if [ ${#need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq "${need[@]}" >&2
    # The tests run opendkim only in its test mode (opendkim -t); a daemon that Debian
    # started because this run installed the package is not wanted (one installed
    # before, the admin's own, is left alone).
    if [[ " ${need[*]} " == *" opendkim "* ]] && command -v systemctl >/dev/null; then
      systemctl disable --now opendkim.service >/dev/null 2>&1 || true
    fi
    # Likewise the DNSSEC tests start their own unbound and nsd on private ports: the
    # daemons (and unbound's hook that would make it this machine's resolver) stay off;
    # so does haproxy's (the PROXY protocol tests start their own).
    for unit in unbound:unbound unbound:unbound-resolvconf nsd:nsd haproxy:haproxy; do
      if [[ " ${need[*]} " == *" ${unit%%:*} "* ]] && command -v systemctl >/dev/null; then
        systemctl disable --now "${unit#*:}.service" >/dev/null 2>&1 || true
      fi
    done
  fi
else
  venv=${EQMAIL_VENV:-$here/.venv}
fi

if [ ! -x "$venv/bin/python" ]; then
  mkdir -p "$(dirname "$venv")"
  /usr/bin/python3 -m venv "$venv" >&2
fi
# The workers drop to system users: an editable install only works when they can read
# this checkout; otherwise install a copy into the (world-readable) venv.
editable=-e
if [ "$(id -u)" = 0 ] && ! runuser -u nobody -- test -r "$here/eqmail/__init__.py" 2>/dev/null; then
  editable=
fi
# Reinstall unless this very checkout is installed editable and pyproject.toml has not
# changed since (the stamp names the checkout: a venv shared with another checkout, or
# a copy installed non-editable, is always reinstalled).
stamp="$venv/.eqmail-installed"
if [ -n "$editable" ] && [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] \
   && [ "$(cat "$stamp")" = "editable $here" ]; then
  :
else
  "$venv/bin/pip" install -q --disable-pip-version-check $editable "$here[test]" >&2
  if [ -n "$editable" ]; then echo "editable $here" > "$stamp"; else echo "copy" > "$stamp"; fi
fi
chmod -R a+rX "$venv" 2>/dev/null || true
echo "$venv"
