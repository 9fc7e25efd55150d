#!/usr/bin/env bash
# Installs the Debian dependencies and builds speed-erase into build/.
# Extra CMake arguments are passed through, e.g. scripts/setup.sh -DSPEED_WERROR=ON
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh --with-python
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release "$@"
cmake --build build -j"$(nproc)"
