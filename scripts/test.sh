#!/usr/bin/env bash
# Runs the test suite (build/ must exist: scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
cmake --build build -j"$(nproc)"
ctest --test-dir build --no-tests=error --output-on-failure -j"$(nproc)" "$@"
