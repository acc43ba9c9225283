# Shared by the scripts in tests/bench/ (sourced, never run). Each caller
# defines log() first.

# --- guest builders (cxx-guest.sh, sshd-guest.sh): root, Debian, with
# DEBIAN_FRONTEND=noninteractive exported ----------------------------------

# install_missing PKG...: installs those of the Debian packages that are not
# installed yet (updating the package lists only when that fails).
install_missing() {
  local p missing=() apt_opts=(-q -o APT::Sandbox::User=root)
  for p in "$@"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
  done
  [ "${#missing[@]}" -gt 0 ] || return 0
  log "installing ${missing[*]}"
  apt-get install -y --no-install-recommends "${apt_opts[@]}" "${missing[@]}" >&2 ||
    { apt-get update "${apt_opts[@]}" >&2; apt-get install -y --no-install-recommends "${apt_opts[@]}" "${missing[@]}" >&2; }
}

# debian_mirror: prints the Debian mirror the machine already uses (deb822 or
# one-line form), as tests/support/install-host-qemu.sh finds it; fails when
# there is none. Never written into the repo.
debian_mirror() {
  local m
  m=$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null \
      | grep -v security | head -n1 || true)
  [ -n "$m" ] ||
    m=$(awk '$1=="deb" && $3 ~ /^bookworm$/ {print $2; exit}' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true)
  [ -n "$m" ] || { log "no bookworm entry found in /etc/apt/sources.list*"; return 1; }
  echo "$m"
}

# --- harnesses (run.sh, sshd-ready.sh): use $bin, $state, $work, $results ---

# end_run RC: what a harness's EXIT trap does after stopping its own
# background jobs: every instance destroyed, anything left that belongs to
# this run (QEMU, supervisors, helpers: their command lines name $work)
# killed, the values measured so far shown when the run failed, $work
# removed; exits RC.
end_run() {
  local rc=$1 p n
  if [ -d "$state/instances" ]; then
    for n in "$state"/instances/*/; do
      [ -d "$n" ] || continue
      timeout 90 "$bin" --state-dir "$state" --name "$(basename "$n")" destroy --force --yes >/dev/null 2>&1 || true
    done
  fi
  for p in /proc/[0-9]*; do
    p=${p#/proc/}
    [ "$p" = $$ ] && continue
    if tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | grep -qF "$work/"; then
      kill -9 "$p" 2>/dev/null || true
    fi
  done
  if [ "$rc" != 0 ] && [ -s "$results" ]; then
    log "stopped early (exit $rc); the values measured so far:"
    cat "$results" >&2
  fi
  rm -rf "$work"
  exit "$rc"
}

# jget FILE KEY...: a value from a JSON file.
jget() { python3 -c 'import json,sys; v=json.load(open(sys.argv[1])); [v:=v[k] for k in sys.argv[2:]]; print(v)' "$@"; }
# Milliseconds between two stamps: ms A B = (B - A) * 1000.
ms() { python3 -c 'import sys; print(f"{(float(sys.argv[2]) - float(sys.argv[1])) * 1e3:.3f}")' "$1" "$2"; }
# put KEY VALUE: one sample into $results; a missing value ends the run.
put() {
  [ -n "$2" ] || { log "no value measured for $1"; exit 1; }
  echo "$1 $2" >> "$results"
}
