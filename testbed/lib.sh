# testbed/lib.sh: helpers shared by the testbed scripts (sourced, not executed).
# Owns: the cache location, logging, content hashing. Must not start anything.

TESTBED_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# Everything built or scratch lives here; override with PEERMEM_CACHE.
PEERMEM_CACHE=${PEERMEM_CACHE:-$HOME/.cache/peermem}

# log/die prefix messages with the calling script's name; both write to stderr.
log() { echo "${0##*/}: $*" >&2; }
die() { echo "${0##*/}: ERROR: $*" >&2; exit 1; }

# content_hash ITEM...: 16 hex digits of sha256 over the items. An item that names an existing
# file contributes its contents; any other item contributes itself as a string.
content_hash() {
  local item
  for item in "$@"; do
    if [[ -f $item ]]; then printf '%s\n' "file:${item##*/}"; cat -- "$item"
    else printf '%s\n' "str:$item"; fi
  done | sha256sum | cut -c1-16
}

# pkg_version PKG: installed Debian version of PKG, or a failure.
pkg_version() {
  local st
  st=$(dpkg-query -W -f='${db:Status-Abbrev}|${Version}' "$1" 2>/dev/null) || return 1
  [[ $st == "ii "* ]] || return 1
  echo "${st#*|}"
}

# with_lock FILE: take an exclusive lock on FILE for the rest of this process (fd 9), telling
# the user when another process holds it (a concurrent build of the same artefact).
with_lock() {
  mkdir -p "$(dirname "$1")"
  exec 9>"$1"
  if ! flock -n 9; then
    log "waiting for another process holding $1"
    flock 9
  fi
}
