#!/usr/bin/env bash
# What `make test` needs on a Debian machine, installed only when missing so
# repeated runs are fast: the real peers (Postfix with smtp-sink, swaks with
# its TLS and IPv6 modules), firewall and namespace tools, pytest, and the
# rustfmt/clippy components. Needs root (or sudo) only when it installs.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

APT_PACKAGES=(postfix swaks libnet-ssleay-perl libio-socket-inet6-perl iptables nftables iproute2 curl openssl procps prometheus systemd)
TOOLS=(postconf postfix smtp-sink sendmail postqueue swaks iptables ip6tables nft ip curl openssl ps sysctl prometheus promtool systemd-analyze setpriv)

sudo=()
if [ "$(id -u)" != 0 ]; then sudo=(sudo); fi

missing=()
for tool in "${TOOLS[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
perl -MNet::SSLeay -MIO::Socket::INET6 -e1 >/dev/null 2>&1 || missing+=("swaks TLS/IPv6 perl modules")

if [ "${#missing[@]}" -gt 0 ]; then
    echo "install-deps: missing ${missing[*]}; installing ${APT_PACKAGES[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Postfix without a system configuration: the tests run their own instances.
    echo "postfix postfix/main_mailer_type select No configuration" | "${sudo[@]}" debconf-set-selections
    "${sudo[@]}" apt-get update -q
    "${sudo[@]}" apt-get install -y -q "${APT_PACKAGES[@]}" </dev/null
    # A package install may start the system Postfix; the tests must not depend
    # on (or collide with) it.
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet postfix 2>/dev/null; then
        "${sudo[@]}" systemctl stop postfix || true
    fi
    if [ -f /etc/postfix/main.cf ] && "${sudo[@]}" postfix status >/dev/null 2>&1; then
        "${sudo[@]}" postfix stop || true
    fi
else
    echo "install-deps: system packages present"
fi

# Exim as a pipelining sending client and as a PIPECONNECT/AUTH MTA
# (tests/e2e/test_turns.py, test_exim.py). exim4-daemon-light conflicts with
# postfix, so it is unpacked, not installed: `dpkg -x` into EXIM_DIR,
# /usr/sbin/exim4 a link to it (Exim re-executes itself there), its user, and
# the libraries postfix does not already pull in.
EXIM_DIR=/opt/mxguard-test/exim4
EXIM_LIBS=(libidn12 libgnutls-dane0 libgnutls30 libdb5.3 libnsl2 libpcre2-8-0)
if ! /usr/sbin/exim4 -C /dev/null -bV >/dev/null 2>&1 || ! getent passwd Debian-exim >/dev/null; then
    echo "install-deps: unpacking exim4-daemon-light into $EXIM_DIR"
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get install -y -q "${EXIM_LIBS[@]}" </dev/null \
        || { "${sudo[@]}" apt-get update -q && "${sudo[@]}" apt-get install -y -q "${EXIM_LIBS[@]}" </dev/null; }
    download=$(mktemp -d)
    (cd "$download" && { apt-get download exim4-daemon-light \
        || { "${sudo[@]}" apt-get update -q && apt-get download exim4-daemon-light; }; })
    "${sudo[@]}" rm -rf "$EXIM_DIR"
    "${sudo[@]}" mkdir -p "$EXIM_DIR"
    "${sudo[@]}" dpkg -x "$download"/exim4-daemon-light_*.deb "$EXIM_DIR"
    rm -rf "$download"
    "${sudo[@]}" ln -sfn "$EXIM_DIR/usr/sbin/exim4" /usr/sbin/exim4
    getent group Debian-exim >/dev/null || "${sudo[@]}" groupadd --system Debian-exim
    getent passwd Debian-exim >/dev/null || "${sudo[@]}" useradd --system --gid Debian-exim \
        --no-create-home --home-dir /var/spool/exim4 --shell /usr/sbin/nologin Debian-exim
    /usr/sbin/exim4 -C /dev/null -bV >/dev/null 2>&1
else
    echo "install-deps: exim4 present"
fi

if ! python3 -m pytest --version >/dev/null 2>&1; then
    echo "install-deps: installing pytest"
    python3 -m pip install -q pytest 2>/dev/null \
        || python3 -m pip install -q --break-system-packages pytest 2>/dev/null \
        || { "${sudo[@]}" apt-get install -y -q python3-pytest </dev/null; }
fi

# The admin API's OpenAPI run (tests/e2e/test_openapi.py); it brings PyYAML,
# which test_prometheus.py reads the alert rules with.
if ! command -v st >/dev/null 2>&1 || ! python3 -c "import schemathesis, yaml" >/dev/null 2>&1; then
    echo "install-deps: installing schemathesis"
    python3 -m pip install -q schemathesis 2>/dev/null \
        || python3 -m pip install -q --break-system-packages schemathesis
fi

cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
cargo clippy --version >/dev/null 2>&1 || rustup component add clippy

# Admission control's stories: a test MTA that really answers AUTH
# (aiosmtpd, tests/e2e/test_sender_limits.py) and Redis for the fleet
# (tests/e2e/test_cluster.py).
if ! command -v redis-server >/dev/null 2>&1; then
    echo "install-deps: installing redis-server"
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get install -y -q redis-server </dev/null \
        || { "${sudo[@]}" apt-get update -q && "${sudo[@]}" apt-get install -y -q redis-server </dev/null; }
    # The tests start their own; the packaged one must not hold the port.
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet redis-server 2>/dev/null; then
        "${sudo[@]}" systemctl stop redis-server || true
    fi
fi
if ! python3 -c "import aiosmtpd" >/dev/null 2>&1; then
    echo "install-deps: installing aiosmtpd"
    python3 -m pip install -q aiosmtpd 2>/dev/null \
        || python3 -m pip install -q --break-system-packages aiosmtpd
fi
