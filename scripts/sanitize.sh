#!/usr/bin/env bash
# ASan + UBSan build of the library, the CLI, the sentencepiece module and the tests, then ctest
# (unit, golden and e2e: the e2e tests, the bad-input matrix among them, run the sanitized CLI).
# CI runs it after the normal test suite (.ci/run), in a fresh folder.
#
#   scripts/sanitize.sh                 configure (once) + build + every test, in build-asan/
#   scripts/sanitize.sh -L unit         extra ctest arguments (here: only the unit label)
#   SPEED_ASAN_BUILD=build-asan-ci      another build folder (CI: one that does not exist yet)
#   SPEED_ASAN_JOBS=1                   build jobs (default: every core)
#   SPEED_ASAN_CTEST_JOBS=1             test binaries run at once (default: every core)
#
# It builds the default target only: the libraries, speed-erase, libspeed_spm_impl.so and the
# test binaries (no benchmark tools). The last line gives the configure, build and test times.
#
# LibTorch, OpenBLAS and the other Debian libraries are not instrumented: ASan sees their heap
# (malloc is intercepted process-wide) but not their internal accesses. What is reported is
# therefore about our code and the torch headers inlined into it. Policy (see docs/reliability.md):
#   - UBSan: every check on, -fno-sanitize-recover (the first report aborts the test binary);
#     scripts/ubsan.supp holds the few narrowly scoped suppressions, each with its reason.
#   - ASan: detect_leaks=1 with scripts/asan.supp (LSan) suppressing only allocations made
#     inside LibTorch/OpenBLAS/glog start-up that live until exit; a leak with one of our frames
#     on top is still reported.
#   - The sentencepiece helper module (src/spm_impl/) is built without sanitizers: it is loaded
#     with dlmopen(LM_ID_NEWLM), and a second ASan runtime in that namespace aborts the process.
#     src/spm.cc, which loads and calls it, is instrumented (docs/reliability.md §5).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${SPEED_ASAN_BUILD:-build-asan}
jobs=${SPEED_ASAN_JOBS:-$(nproc)}
ctest_jobs=${SPEED_ASAN_CTEST_JOBS:-$(nproc)}
start=$(date +%s)

if [[ ! -f $build/build.ninja ]]; then
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSPEED_SANITIZE=ON >/dev/null
fi
configured=$(date +%s)
echo "sanitize.sh: configured '$build' in $((configured - start)) s; building with $jobs job(s)"
ninja -C "$build" -j"$jobs"
built=$(date +%s)
echo "sanitize.sh: built in $((built - configured)) s; running ctest with $ctest_jobs job(s)"

supp=$PWD/scripts
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1}
# Leak suppressions are LSan's (scripts/asan.supp holds only `leak:` lines).
export LSAN_OPTIONS=${LSAN_OPTIONS:-suppressions=$supp/asan.supp:print_suppressions=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1:suppressions=$supp/ubsan.supp}
export OMP_WAIT_POLICY=PASSIVE
rc=0
ctest --test-dir "$build" --no-tests=error --output-on-failure -j"$ctest_jobs" "$@" || rc=$?
end=$(date +%s)
echo "sanitize.sh: configure $((configured - start)) s, build $((built - configured)) s, tests $((end - built)) s, total $((end - start)) s, ctest exit $rc"
exit $rc
