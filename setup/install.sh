#!/usr/bin/env bash
# Set up a fresh Debian machine for this project: the system packages, then the virtual environment
# from the committed lock. Idempotent: a second run installs nothing unless the lock or pyproject changed,
# or a recipe was added that needs packages not yet installed.
#   bash setup/install.sh             set up
#   bash setup/install.sh --packages  list the Debian packages it would make sure of, and stop
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
VENV=.venv

# The base packages, then each recipe's OCR model and fonts: the one-line list `data_prep.debian_packages`
# that `python -m data_prep recipe` writes (tests/test_recipes.py checks this reads every recipe's list).
mapfile -t wanted < <({
    grep -Ehv '^\s*(#|$)' setup/debian-packages.txt
    sed -n 's/^  debian_packages: *\[\([^]]*\)\].*/\1/p' recipes/*.yaml | tr ', ' '\n\n' | grep -v '^$' | sort
} | awk '!seen[$0]++')
if [ "${1:-}" = "--packages" ]; then
    printf '%s\n' "${wanted[@]}"
    exit 0
fi
missing=()
for package in "${wanted[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
    echo "setup: installing Debian packages: ${missing[*]}"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -qq
    for package in "${missing[@]}"; do
        # a name no archive has (a typo in a recipe) stops here, named, not inside apt-get's long output
        apt-cache show "$package" >/dev/null 2>&1 || {
            echo "setup: Debian package $package is not installable here (apt-cache show finds none); it is named in" \
                "$(grep -l -- "$package" setup/debian-packages.txt recipes/*.yaml | tr '\n' ' ')- fix the name there." >&2
            exit 1
        }
    done
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
