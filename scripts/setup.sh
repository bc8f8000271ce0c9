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
  passt
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
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -e "$stamp" ]; then
  echo "setup: installing Python packages"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  touch "$stamp"
fi

echo "setup: building the kit"
.venv/bin/appliance kit build
