#!/usr/bin/env bash
# Runs the test suite (build/ must exist: scripts/setup.sh).
#   scripts/test.sh                 build + ctest (extra arguments go to ctest, e.g. -L golden)
#   scripts/test.sh --with-fuzz     the same, then a 10 s pass of every fuzz target (what CI runs;
#                                   needs clang: scripts/install-deps.sh --with-fuzz)
set -euo pipefail
cd "$(dirname "$0")/.."
fuzz=0
if [ "${1:-}" = "--with-fuzz" ]; then
  fuzz=1
  shift
fi
cmake --build build -j"$(nproc)"
ctest --test-dir build --no-tests=error --output-on-failure -j"$(nproc)" "$@"
if [ "$fuzz" = 1 ]; then
  scripts/fuzz.sh --all 10
fi
