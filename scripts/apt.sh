# Debian package helpers, sourced by install-deps.sh and cross.sh (which define `log` and the
# `SUDO` array before sourcing this).
#   deb_installed PKG      true when PKG is installed
#   install_debs PKG...    installs the missing ones: one `apt-get update` per script run, and
#                          one retry of the install
# shellcheck shell=bash

deb_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

APT_UPDATED=0
install_debs() {
  local missing=() p
  for p in "$@"; do deb_installed "$p" || missing+=("$p"); done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if [[ $APT_UPDATED -eq 0 ]]; then
    "${SUDO[@]}" apt-get update -qq
    APT_UPDATED=1
  fi
  # Big installs here sometimes fail once with "cannot stat ... .deb"; a second try works.
  if ! "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"; then
    log "apt-get install failed; retrying once"
    "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
}
