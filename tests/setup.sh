#!/usr/bin/env bash
# Everything the test suite needs on a Debian bookworm host, as root:
# QEMU 10 (backports) and 7.2 beside it, virtiofsd, OpenSSH's client, Guile
# (reads the guix/ files), and the busybox test guest. Idempotent.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export DEBIAN_FRONTEND=noninteractive

need=()
for p in openssh-client guile-3.0 git python3 bash tar util-linux coreutils; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  apt-get install -y -q --no-install-recommends "${need[@]}" || { apt-get update -q && apt-get install -y -q --no-install-recommends "${need[@]}"; }
fi
"$here/support/install-host-qemu.sh"
"$here/support/install-virtiofsd.sh"
"$here/guest/build.sh"
