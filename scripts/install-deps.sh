#!/usr/bin/env bash
# Installs everything speed-erase needs to build and test on Debian 12.
# Usage: scripts/install-deps.sh [--with-python] [--with-fuzz]
set -euo pipefail
pkgs=(
  cmake g++ make pkg-config ninja-build
  libtorch-dev
  libopenblas0-pthread          # named explicitly: otherwise the reference BLAS is used (~20x slower)
  libsentencepiece-dev sentencepiece
  libcli11-dev nlohmann-json3-dev libspdlog-dev libfmt-dev libeigen3-dev catch2
  libutf8proc-dev zlib1g-dev
  time                          # /usr/bin/time -v: peak RSS in scripts/bench.sh
)
for a in "$@"; do
  case "$a" in
    --with-python) pkgs+=(python3-torch) ;;
    --with-fuzz) pkgs+=(clang clang-14 libclang-rt-14-dev) ;;
    *) echo "error: unknown option '$a'" >&2; exit 2 ;;
  esac
done
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${pkgs[@]}"
