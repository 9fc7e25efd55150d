#!/usr/bin/env bash
# ctest unused_libs: the libraries speed-erase-cli loads an empty stand-in for are unused by
# everything it does load (scripts/unused-libs.sh check), and the check itself fails on a copy
# of the program and its folder whose manifest is wrong in either of two ways (below).
# Usage: tests/unused_libs.sh [--expect-some] PROGRAM DIR
set -euo pipefail
script="$(dirname "$0")/../scripts/unused-libs.sh"
bash "$script" check "$@"
prog="${*: -2:1}" dir="${*: -1}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp "$prog" "$tmp/" && cp -a "$dir" "$tmp/unused-libs"
zlib=$(ldd "$prog" | awk '$1 == "libz.so.1" { print $3 }')
[ -n "$zlib" ] || { echo "error: the program does not load libz.so.1: nothing to test with" >&2; exit 1; }
# Two wrong manifests: one names libz.so.1 itself (loaded from the system, so not replaced);
# one gives the first replaced library libz's path as the library it stands in for (so the
# program and libprotobuf take symbols, inflate among them, from a replaced library).
cp "$tmp/unused-libs/manifest.txt" "$tmp/good.txt"
printf 'libz.so.1\t%s\n' "$zlib" >>"$tmp/unused-libs/manifest.txt"
expect_failure() {  # expect_failure WHAT PATTERN
  local out
  if out=$(bash "$script" check "$tmp/$(basename "$prog")" "$tmp/unused-libs" 2>&1); then
    echo "error: check passed a manifest where $1:" >&2; echo "$out" >&2; exit 1
  fi
  grep -q -- "$2" <<<"$out" ||
    { echo "error: check failed, but not with '$2' ($1):" >&2; echo "$out" >&2; exit 1; }
  echo "check catches it when $1: $(grep -c '^error' <<<"$out") error line(s)"
}
expect_failure "libz.so.1 is listed as replaced" "libz.so.1 is loaded from"
first=$(head -1 "$tmp/good.txt" | cut -f1)
if [ -z "$first" ]; then  # only without --expect-some: check above refused an empty manifest
  echo "nothing was replaced: the second wrong manifest (a replaced library given libz's path)" \
    "needs one; not run"
  exit 0
fi
awk -F'\t' -v f="$first" -v z="$zlib" 'BEGIN { OFS = "\t" } $1 == f { $2 = z } { print }' \
  "$tmp/good.txt" >"$tmp/unused-libs/manifest.txt"
expect_failure "$first stands in for libz" "takes inflate from $first"
