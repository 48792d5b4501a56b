#!/usr/bin/env bash
# bench/setup_proxies.sh: install what bench/bench_proxy.py compares egresslock with.
#
#   Debian: squid, tinyproxy (comparison proxies), nginx (the upstream HTTP server), wrk (load)
#   PyPI:   mitmproxy (mitmdump) in its own venv, bench/.venv-mitm; never in the project venv
#
# The Debian packages come with system services. The benchmark never uses them: it starts its
# own instances, in the foreground, with its own config files in a temp dir, on loopback ports.
# So this script keeps the services from starting at install time, and stops and disables any
# that run anyway, so that nothing is left bound to ports 80, 3128 or 8888.
#
# Usage: sudo bash bench/setup_proxies.sh      (as root: apt-get needs it)
#        SKIP_APT=1 bash bench/setup_proxies.sh  (only the mitmproxy venv)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
services=(squid tinyproxy nginx)

stop_services() {
    local svc
    for svc in "${services[@]}"; do
        if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
            systemctl disable --now "$svc" >/dev/null 2>&1 || true
        fi
        if [ -x "/etc/init.d/$svc" ]; then
            "/etc/init.d/$svc" stop >/dev/null 2>&1 || true
        fi
        if command -v update-rc.d >/dev/null 2>&1; then
            update-rc.d "$svc" disable >/dev/null 2>&1 || true
        fi
    done
    # Whatever a service left running: ask each pid from its own pid file to stop.
    local pidfile pid
    for pidfile in /run/squid.pid /var/run/squid.pid /run/tinyproxy/tinyproxy.pid \
                   /var/run/tinyproxy/tinyproxy.pid /run/nginx.pid /var/run/nginx.pid; do
        if [ -s "$pidfile" ]; then
            pid="$(tr -dc 0-9 <"$pidfile")"
            if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
                kill "$pid" 2>/dev/null || true
            fi
        fi
    done
}

if [ "${SKIP_APT:-0}" != 1 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "setup_proxies.sh: apt-get needs root (or run with SKIP_APT=1 for mitmproxy only)" >&2
        exit 1
    fi
    # Keep the packages' services from starting during the install (policy-rc.d: 101 = deny).
    made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    trap '[ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d' EXIT
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends squid tinyproxy nginx-light wrk >/dev/null \
        || apt-get install -y -qq --no-install-recommends squid tinyproxy nginx wrk >/dev/null
    stop_services
fi

# mitmproxy wants a recent Python; take the newest one that is here.
py=""
for cand in python3.13 python3.12 python3; do
    if "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1; then
        py="$cand"
        break
    fi
done
if [ -z "$py" ]; then
    echo "setup_proxies.sh: no Python >= 3.10 for mitmproxy" >&2
    exit 1
fi
if [ ! -x "$here/.venv-mitm/bin/mitmdump" ]; then
    "$py" -m venv "$here/.venv-mitm"
    "$here/.venv-mitm/bin/pip" install -q --upgrade pip
    "$here/.venv-mitm/bin/pip" install -q mitmproxy
fi

echo "installed:"
for tool in squid tinyproxy nginx wrk; do
    printf '  %-10s %s\n' "$tool" "$(command -v "$tool" || echo 'not found')"
done
printf '  %-10s %s\n' mitmdump "$("$here/.venv-mitm/bin/mitmdump" --version 2>/dev/null \
    | head -1 || echo 'not found')"
