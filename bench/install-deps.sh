#!/usr/bin/env bash
# What `make bench` needs beyond `make test`'s peers (tests/install-deps.sh
# installs Postfix: smtp-sink, smtp-source, postscreen): HAProxy. Installed
# only when missing. Needs root (or sudo) only when it installs.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

sudo=()
if [ "$(id -u)" != 0 ]; then sudo=(sudo); fi

missing=()
for tool in haproxy postfix smtp-source smtp-sink; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "bench/install-deps: missing ${missing[*]}; installing haproxy postfix"
    export DEBIAN_FRONTEND=noninteractive
    echo "postfix postfix/main_mailer_type select No configuration" | "${sudo[@]}" debconf-set-selections
    "${sudo[@]}" apt-get install -y -q haproxy postfix </dev/null \
        || { "${sudo[@]}" apt-get update -q && "${sudo[@]}" apt-get install -y -q haproxy postfix </dev/null; }
    # The package may start the system HAProxy or Postfix; the suite runs its own.
    if command -v systemctl >/dev/null 2>&1; then
        "${sudo[@]}" systemctl stop haproxy postfix 2>/dev/null || true
    fi
else
    echo "bench/install-deps: haproxy and postfix present"
fi
