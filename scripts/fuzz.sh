#!/usr/bin/env bash
# Builds the libFuzzer targets (clang, ASan + UBSan, libraries instrumented for coverage) in
# build-fuzz/ and runs them.
#
#   scripts/fuzz.sh --list                  the targets
#   scripts/fuzz.sh --build                 build only
#   scripts/fuzz.sh --all [SECONDS]         every target for SECONDS each (default 10: the CI pass)
#   scripts/fuzz.sh --all-runs N            every target for N executions each
#   scripts/fuzz.sh TARGET [SECONDS]        one target (default 60 s)
#   scripts/fuzz.sh TARGET --runs N         one target for N executions
#   extra libFuzzer flags after `--`, e.g.  scripts/fuzz.sh fuzz_preset 30 -- -max_len=4096
#
# Seeds come from fuzz/corpus/<target>/ (committed, small); the growing corpus lives in
# build-fuzz/corpus/<target>/ and crashes in build-fuzz/artifacts/<target>/. Exit status 1 when a
# target crashed, leaked, hung (-timeout) or hit a sanitizer report; a summary line per target
# gives the executions and exec/s (copy them into docs/reliability.md).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
build=${SPEED_FUZZ_BUILD:-build-fuzz}
jobs=${SPEED_FUZZ_JOBS:-2}

configure() {
  if [[ ! -f $build/build.ninja ]]; then
    CC=${CC:-clang} CXX=${CXX:-clang++} cmake -S . -B "$build" -G Ninja \
      -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSPEED_FUZZ=ON -DSPEED_SANITIZE=ON -DSPEED_BUILD_TESTS=OFF \
      -DCMAKE_C_FLAGS="-fsanitize=fuzzer-no-link" -DCMAKE_CXX_FLAGS="-fsanitize=fuzzer-no-link" >/dev/null
  fi
}

targets() {
  for f in fuzz/fuzz_*.cc; do basename "$f" .cc; done
}

build_all() {
  configure
  # shellcheck disable=SC2046
  ninja -C "$build" -j"$jobs" $(targets)
}

# run_one TARGET MODE VALUE [libFuzzer flags...]; MODE is "time" (seconds) or "runs".
run_one() {
  local t=$1 mode=$2 value=$3
  shift 3
  local corpus=$build/corpus/$t artifacts=$build/artifacts/$t log=$build/logs/$t.log
  mkdir -p "$corpus" "$artifacts" "$(dirname "$log")"
  local seeds=()
  [[ -d fuzz/corpus/$t ]] && seeds=("fuzz/corpus/$t")
  local dict=()
  local base=${t#fuzz_}
  base=${base%%_*}
  [[ -f fuzz/$base.dict ]] && dict=("-dict=fuzz/$base.dict")
  local limit=(-max_total_time="$value")
  [[ $mode == runs ]] && limit=(-runs="$value")
  # Leaks matter here (the parsers are ours, no LibTorch in these binaries).
  export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:symbolize=1}
  export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
  export SPEED_ERASE_TOKENIZER=${SPEED_ERASE_TOKENIZER:-$root/../shared/data/clip/bpe_simple_vocab_16e6.txt.gz}
  local rc=0
  "$build/fuzz/$t" "${limit[@]}" -timeout=10 -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
    -artifact_prefix="$artifacts/" "${dict[@]}" "$@" "$corpus" "${seeds[@]}" >"$log" 2>&1 || rc=$?
  local execs speed
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  local found
  found=$(find "$artifacts" -type f | wc -l)
  printf '%-22s rc=%d executions=%s exec/s=%s corpus=%s artifacts=%s log=%s\n' "$t" "$rc" "${execs:-?}" \
    "${speed:-?}" "$(find "$corpus" -type f | wc -l)" "$found" "$log"
  if [[ $rc -ne 0 ]]; then
    grep -m5 -E 'ERROR|SUMMARY|runtime error|deadly signal|Timeout' "$log" || true
    return 1
  fi
}

main() {
  local mode=${1:---all}
  shift || true
  local extra=()
  local args=()
  while [[ $# -gt 0 ]]; do
    if [[ $1 == -- ]]; then
      shift
      extra=("$@")
      break
    fi
    args+=("$1")
    shift
  done
  case $mode in
    --list) targets ;;
    --build) build_all ;;
    --all | --all-runs)
      build_all
      local failed=0
      local kind=time value=${args[0]:-10}
      [[ $mode == --all-runs ]] && kind=runs value=${args[0]:?--all-runs needs N}
      for t in $(targets); do run_one "$t" "$kind" "$value" "${extra[@]}" || failed=1; done
      exit $failed
      ;;
    -h | --help) sed -n '2,17p' "$0" ;;
    *)
      build_all
      if [[ ${args[0]:-} == --runs ]]; then
        run_one "$mode" runs "${args[1]:?--runs needs N}" "${extra[@]}"
      else
        run_one "$mode" time "${args[0]:-60}" "${extra[@]}"
      fi
      ;;
  esac
}

main "$@"
