#!/usr/bin/env bash
# Fails when a C++ source differs from .clang-format (pass --fix to rewrite in place).
set -euo pipefail
cd "$(dirname "$0")/.."
files=$(git ls-files '*.cc' '*.h' '*.cpp')
if [ "${1:-}" = "--fix" ]; then
  clang-format -i $files
  exit 0
fi
bad=0
for f in $files; do
  if ! clang-format --dry-run --Werror "$f" >/dev/null 2>&1; then
    echo "format drift: $f" >&2
    bad=1
  fi
done
exit $bad
