#!/usr/bin/env bash
# Checks that every command in the README's quick start runs as written from
# a fresh clone: each is committed executable and answers --help. (A script
# committed without its execute bit once made the first command fail with
# "Permission denied".) Checks the committed tree (HEAD), not the work tree.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
git clone -q --no-hardlinks "$ROOT" "$tmp/clone"
cd "$tmp/clone"
# The first ```sh block after "## Quick start": one command a line, before any comment.
cmds=$(awk '/^## Quick start/ {q=1} q && /^```sh/ {b=1; next} b && /^```/ {exit} b' README.md \
  | sed 's/#.*//' | awk 'NF {print $1}')
[ -n "$cmds" ] || { echo "check-quickstart: README.md has no commands under '## Quick start'" >&2; exit 1; }
fail=0
for c in $cmds; do
  if [ ! -x "$c" ]; then
    echo "check-quickstart: $c is not executable in a fresh clone (git update-index --chmod=+x $c)" >&2
    fail=1; continue
  fi
  if ! out=$("./$c" --help 2>&1) || [ -z "$out" ]; then
    echo "check-quickstart: '$c --help' failed in a fresh clone: $out" >&2
    fail=1; continue
  fi
  echo "quick start: $c runs as written"
done
exit $fail
