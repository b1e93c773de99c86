#!/usr/bin/env bash
# Set up a fresh Debian machine for this project: the system packages, then the virtual environment
# from the committed lock. Idempotent: a second run installs nothing unless the lock or pyproject changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
VENV=.venv

mapfile -t wanted < <(grep -Ev '^\s*(#|$)' setup/debian-packages.txt)
missing=()
for package in "${wanted[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
    echo "setup: installing Debian packages: ${missing[*]}"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

lock_hash=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$VENV/.installed" 2>/dev/null)" != "$lock_hash" ]; then
    echo "setup: installing the Python packages of requirements.lock into $VENV (a few minutes the first time)"
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    # torch and torchvision are pinned together (DESIGN.md section 4); pip takes them from this machine's disk
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r requirements.lock 2> >(grep -v "is ignored: it is neither" >&2)
    "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e . 2> >(grep -v "is ignored: it is neither" >&2)
    echo "$lock_hash" > "$VENV/.installed"
fi
