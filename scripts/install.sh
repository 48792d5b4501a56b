#!/usr/bin/env bash
# Install everything egresslock needs on a fresh Debian machine, then run it on an example.
#   system packages (apt-get): the clients the tests drive and the kernel tools the sandbox uses
#   .venv: egresslock itself (editable) and its dev tools (ruff, mypy, pytest, hypothesis)
# Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  python3-venv python3-dev gcc          # the virtual environment; httptools/uvloop wheels or builds
  curl wget git ca-certificates         # real clients the integration tests drive
  nftables libnftables1 iptables        # in-namespace capture rules and the compile targets' checks
  iproute2 bubblewrap libseccomp2       # namespaces, test hosts, seccomp
  openssl sqlite3                       # test CAs; reading the audit database by hand
  iputils-ping util-linux               # the escape suite's ping; unshare/setpriv/nsenter
  python3-requests python3-httpx        # Python clients inside the sandbox, which run as nobody
)                                       # under root and so cannot read a Python under /root

# Node.js drives one client test (fetch through the proxy); keep a node the machine already has.
command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || APT_PACKAGES+=(nodejs npm)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "==> apt-get install ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
echo "==> pip install -e '.[dev]'"
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 \
  | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import egresslock, httptools, pydantic" # fail here, not in the tests
# Bytecode now, so a wrapped tool call (egresslock run) never compiles modules at start-up, even
# where PYTHONDONTWRITEBYTECODE is set: that costs ~45 ms per run.
.venv/bin/python -m compileall -q src .venv/lib >/dev/null 2>&1 || true

echo "==> scripts/demo.sh: egresslock on examples/local-demo.yaml"
scripts/demo.sh
