#!/usr/bin/env bash
# Install what overcommitd needs on a fresh Debian machine (as root) into ./.venv.
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=(python3 python3-venv python3-dev gcc pkg-config)
missing=()
for p in "${apt_packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# QEMU, libvirt (libvirt-python builds against libvirt-dev), mosquitto, the guest image.
bash scripts/setup-host.sh

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e ".[test,dev]"
