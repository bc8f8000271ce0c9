#!/usr/bin/env bash
# One-shot set-up for a fresh Debian 12 machine (run as root): Debian packages,
# the project venv, and the kit (test guest + Linux kit). Idempotent: each step
# is skipped when its result is already present.
set -euo pipefail
cd "$(dirname "$0")/.."

DEB_PACKAGES=(
  build-essential python3-venv python3-dev libffi-dev
  busybox-static cpio kmod
  qemu-utils qemu-system-x86 qemu-system-common
  acpica-tools iproute2 nftables tcpdump tshark
  passt ethtool
  isc-dhcp-client dhcpcd-base
  dpdk-dev
)

missing=()
for p in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
# The editable install puts the tree on sys.path with a plain .pth line
# (editable_mode=compat): setuptools' default import-hook finder costs every
# `appliance` start ~10 ms of pathlib/re imports at site time. The mode is part
# of the stamp so existing venvs are reinstalled once.
EDITABLE_MODE=compat
stamp=.venv/.installed-$( (cat pyproject.toml; echo "$EDITABLE_MODE") | sha256sum | cut -c1-16)
if [ ! -e "$stamp" ]; then
  echo "setup: installing Python packages"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]' --config-settings editable_mode=$EDITABLE_MODE 2>/dev/null \
    || .venv/bin/pip install -q -e '.[dev]'
  touch "$stamp"
fi
# Bytecode for the tree, as a regular (non-editable) install would have: the
# environment may set PYTHONDONTWRITEBYTECODE, and compiling every module at
# every start costs `appliance run` tens of milliseconds. Only changed files
# are recompiled.
.venv/bin/python -m compileall -q appliance >/dev/null

echo "setup: building the kit"
.venv/bin/appliance kit build
