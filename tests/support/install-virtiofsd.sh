#!/usr/bin/env bash
# Installs virtiofsd (the Rust one, from crates.io) into /usr/local/bin, so
# every user finds it on PATH: bookworm has no package. Builds in about two
# minutes with Debian's libseccomp-dev and libcap-ng-dev. Idempotent; needs
# root. VIRTIOFSD_VERSION pins the version (the one tested).
set -euo pipefail
version=${VIRTIOFSD_VERSION:-1.14.0}
prefix=${VIRTIOFSD_PREFIX:-/usr/local}
if [ -x "$prefix/bin/virtiofsd" ] && "$prefix/bin/virtiofsd" --version 2>/dev/null | grep -q "$version"; then
  echo "install-virtiofsd: up to date: $("$prefix/bin/virtiofsd" --version | head -n1)"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
need=()
for p in libseccomp-dev libcap-ng-dev pkg-config; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  apt-get install -y -q --no-install-recommends "${need[@]}" || { apt-get update -q && apt-get install -y -q --no-install-recommends "${need[@]}"; }
fi
cargo install --locked --quiet --root "$prefix" --version "$version" virtiofsd
echo "install-virtiofsd: $("$prefix/bin/virtiofsd" --version | head -n1)"
