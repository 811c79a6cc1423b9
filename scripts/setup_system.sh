#!/usr/bin/env bash
# Install the Debian packages the demo corpus needs: espeak-ng and flite (extra
# prompt speakers) and fortunes (public-domain sentence source).
# Idempotent: packages that are already installed are left alone.
set -euo pipefail

PACKAGES=(espeak-ng flite fortunes fortune-mod)

missing=()
for pkg in "${PACKAGES[@]}"; do
    # dpkg-query reports "install ok installed" only for fully installed packages.
    if dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        echo "setup_system: $pkg already installed"
    else
        missing+=("$pkg")
    fi
done

if [ ${#missing[@]} -eq 0 ]; then
    echo "setup_system: nothing to do"
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
else
    echo "setup_system: need root (or sudo) to install: ${missing[*]}" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
echo "setup_system: apt-get update"
"${SUDO[@]}" apt-get update -q
echo "setup_system: installing ${missing[*]}"
"${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
echo "setup_system: done"
