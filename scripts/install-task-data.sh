#!/usr/bin/env bash
# Installs the Debian packages whose text the benchmark tasks read (src/lorank/bench/tasks/):
#   wordnet-base  WordNet 3.0 database        -> format-json, wordnet-lexname
#   dict-vera     V.E.R.A. acronym dictionary -> facts-100, facts-300, facts-1000
#   manpages-dev  Linux man-pages, sections 2 and 3 -> man-names
# code-docstring reads the Python standard library and needs nothing installed.
# Idempotent: does nothing (no apt-get update) when every package and its data is present.
set -euo pipefail

declare -A PROBE=(
  [wordnet-base]=/usr/share/wordnet/data.noun
  [dict-vera]=/usr/share/dictd/vera.index
  [manpages-dev]=/usr/share/man/man3/strlen.3.gz
)

missing=()
for pkg in wordnet-base dict-vera manpages-dev; do
  status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
  if [[ "$status" != "install ok installed" || ! -e "${PROBE[$pkg]}" ]]; then
    missing+=("$pkg")
  fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
  echo "install-task-data: wordnet-base dict-vera manpages-dev already installed"
  exit 0
fi

SUDO=()
if [[ $(id -u) -ne 0 ]]; then SUDO=(sudo); fi
export DEBIAN_FRONTEND=noninteractive
echo "install-task-data: installing ${missing[*]}"
"${SUDO[@]}" apt-get update -q
# --reinstall brings back files of a package that is installed but whose data went missing
"${SUDO[@]}" apt-get install -y -q --no-install-recommends --reinstall "${missing[@]}"

for pkg in "${missing[@]}"; do
  if [[ ! -e "${PROBE[$pkg]}" ]]; then
    echo "install-task-data: $pkg installed but ${PROBE[$pkg]} is missing" >&2
    echo "  (is /usr/share/man or /usr/share excluded in /etc/dpkg/dpkg.cfg.d/?)" >&2
    exit 1
  fi
done
echo "install-task-data: done"
