#!/usr/bin/env bash
# Installs QEMU 10 from bookworm-backports (the mirror is read from the host's
# own apt sources, never written here) and unpacks bookworm's QEMU 7.2 beside
# it, so both versions can be tested on one host. Idempotent; needs root.
set -euo pipefail

qemu72_dir=${QEMU72_DIR:-/opt/qbuf-qemu-test/qemu-7.2}

need_update=0
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  # The debian mirror URI the machine already uses (deb822 or one-line form).
  uri=$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | grep -v security | head -n1 || true)
  if [ -z "$uri" ]; then
    uri=$(awk '$1=="deb" && $3 ~ /^bookworm$/ {print $2; exit}' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true)
  fi
  if [ -z "$uri" ]; then
    echo "install-host-qemu: no bookworm entry found in /etc/apt/sources.list*: add bookworm-backports yourself" >&2
    exit 1
  fi
  printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    "$uri" > /etc/apt/sources.list.d/qbuf-qemu-backports.sources
  need_update=1
fi
if [ "$need_update" = 1 ] || [ ! -d /var/lib/apt/lists ] || [ -z "$(ls /var/lib/apt/lists/*backports* 2>/dev/null)" ]; then
  apt-get update -q
fi

export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends -t bookworm-backports qemu-system-x86 qemu-utils
# QEMU 7.2 below finds its firmware through these packages.
apt-get install -y -q --no-install-recommends seabios ipxe-qemu

# QEMU 7.2 (bookworm's own) unpacked beside QEMU 10 without replacing it.
if [ ! -x "$qemu72_dir/usr/bin/qemu-system-x86_64" ]; then
  tmp=$(mktemp -d)
  # Each package at bookworm's own version (arch-all ones carry no binNMU suffix).
  for pkg in qemu-system-x86 qemu-system-common qemu-system-data; do
    ver=$(apt-cache madison "$pkg" | awk -F'|' '$2 !~ /bpo/ {gsub(/ /,"",$2); print $2; exit}')
    (cd "$tmp" && apt-get download -q "$pkg=$ver")
  done
  mkdir -p "$qemu72_dir"
  for deb in "$tmp"/*.deb; do dpkg-deb -x "$deb" "$qemu72_dir"; done
  rm -rf "$tmp"
fi
# Firmware that 7.2's data package only links to (seabios, ipxe ROMs): always
# re-linked, so an interrupted earlier run is repaired.
for f in /usr/share/qemu/* /usr/share/seabios/* /usr/lib/ipxe/qemu/*; do
  b=$(basename "$f")
  [ -e "$qemu72_dir/usr/share/qemu/$b" ] || ln -sfn "$f" "$qemu72_dir/usr/share/qemu/$b"
done
for f in "$qemu72_dir"/usr/share/qemu/*; do
  if [ -L "$f" ] && [ ! -e "$f" ]; then
    b=$(basename "$f"); [ -e "/usr/share/qemu/$b" ] && ln -sfn "/usr/share/qemu/$b" "$f"
  fi
done
echo "install-host-qemu: $(qemu-system-x86_64 --version | head -n1)"
echo "install-host-qemu: $("$qemu72_dir/usr/bin/qemu-system-x86_64" -L "$qemu72_dir/usr/share/qemu" --version | head -n1)"
