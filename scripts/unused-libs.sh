#!/usr/bin/env bash
# unused-libs.sh: stands one empty library in for the shared libraries a program loads but never
# uses, so that the dynamic loader maps, relocates against and searches fewer objects.
#
# Debian's libtorch_cpu names ~45 libraries it needs, among them OpenCV, FFmpeg, LevelDB, LMDB
# and ZeroMQ (Caffe2's image, video and database operators were linked without --as-needed), and
# through them ~290 objects get loaded, although libtorch_cpu takes no symbol from most of them.
# Every symbol the loader resolves is looked up in every object of the global scope in turn, so
# those objects cost ~0.2 s at every start (docs/performance.md). speed-erase-cli's DT_RPATH puts
# a folder of links (NAME -> libspeed_unused.so, an empty library) before the system folders;
# since libtorch_cpu has no RUNPATH of its own, the loader finds the links there first.
#
# A library L is replaced only when all of these hold, for the set of objects that would still
# be loaded (computed again after every round, as replacing a library also drops what it loads):
#   - no loaded object has an undefined dynamic symbol that L defines (nothing binds to L, so no
#     binding changes: L's symbols cannot interpose on anyone's);
#   - L has no undefined symbol that a LibTorch library (libtorch*, libc10*) defines: a library
#     that calls into LibTorch may register operators from its constructors, and is kept;
#   - L is not one the program names itself, nor glibc, libstdc++, libgcc_s, a sanitizer
#     runtime, or LibTorch's own.
# An empty library has no constructors: what L's own would have done (OpenCV's, FFmpeg's) no
# longer happens, which is the point. `check` re-derives the property from the loader's actual
# list (ldd) of the finished program; the build's test suite runs it.
#
# Usage: scripts/unused-libs.sh make PROGRAM STUB DIR
#          (re)creates DIR: a copy of STUB, a link NAME -> STUB for each replaced library, and
#          manifest.txt ("NAME<TAB>real path" per line), then runs `check` on it. With nothing to
#          replace, when ldd or readelf is missing or a library is not found, or when the check
#          fails, DIR holds only an empty manifest (the program then loads everything, as
#          before) and a warning is printed.
#        scripts/unused-libs.sh check [--expect-some] PROGRAM DIR
#          exits non-zero, naming the symbols, when the program as loaded takes any symbol from
#          a replaced library or a replaced library calls into LibTorch (or, with
#          --expect-some, when nothing was replaced); prints a summary.
set -euo pipefail

die() { echo "error: unused-libs: $*" >&2; exit 2; }

# elf_table NAME PATH: the records the analysis reads, one per line, tab-separated:
#   N NAME DEP   (DT_NEEDED)   D NAME SYM (defined global dynamic symbol)   U NAME SYM (undefined)
elf_table() {
  local name="$1" path="$2"
  readelf -d -W "$path" | awk -v n="$name" -F'[][]' '/\(NEEDED\)/ { print "N\t" n "\t" $2 }'
  # Columns: Num: Value Size Type Bind Vis Ndx Name[@version]. Only the dynamic symbol table.
  readelf --dyn-syms -W "$path" | awk -v n="$name" '
    $1 ~ /^[0-9]+:$/ && NF >= 8 && ($5 == "GLOBAL" || $5 == "WEAK" || $5 == "UNIQUE") {
      sym = $8; sub(/@.*/, "", sym)
      if (sym == "") next
      if ($7 == "UND") print "U\t" n "\t" sym
      else if ($4 != "SECTION" && $4 != "FILE") print "D\t" n "\t" sym
    }'
}

# loaded PROGRAM: "NAME<TAB>PATH" for each object the loader maps (ldd), NAME as it was asked for.
# Fails when a library is not found.
loaded() {
  local out
  out=$(ldd "$1") || die "ldd '$1' failed"
  if grep -q "not found" <<<"$out"; then
    die "ldd '$1': $(grep "not found" <<<"$out" | head -1 | sed 's/^[[:space:]]*//')"
  fi
  awk '$2 == "=>" && $3 ~ /^\// { print $1 "\t" $3 }' <<<"$out"
}

is_kept_kind() {  # never replaced: the C/C++ runtime, sanitizer runtimes, LibTorch itself
  case "$1" in
    ld-linux*|libc.so*|libm.so*|libpthread.so*|libdl.so*|librt.so*|libstdc++.so*|libgcc_s.so*|\
    libasan.so*|libubsan.so*|liblsan.so*|libtsan.so*|libtorch*|libc10*|libcaffe2*) return 0 ;;
  esac
  return 1
}

is_torch() { case "$1" in libtorch*|libc10*|libcaffe2*) return 0 ;; esac; return 1; }

# analyse PROGRAM LOADED: prints the names of the libraries that can be replaced (LOADED: what
# `loaded PROGRAM` printed).
analyse() {
  local prog="$1" name path
  local -A direct=()
  while read -r name; do direct[$name]=1; done < <(readelf -d -W "$prog" |
    awk -F'[][]' '/\(NEEDED\)/ { print $2 }')
  {
    elf_table "@program" "$prog"
    while IFS=$'\t' read -r name path; do
      elf_table "$name" "$path"
      if is_torch "$name"; then
        printf 'T\t%s\n' "$name"
      elif ! is_kept_kind "$name" && [ -z "${direct[$name]:-}" ]; then
        printf 'C\t%s\n' "$name"
      fi
    done <<<"$2"
  } | awk -F'\t' '
    $1 == "N" { nn[$2]++; need[$2, nn[$2]] = $3; next }
    $1 == "D" { nd[$2]++; def[$2, nd[$2]] = $3; next }
    $1 == "U" { nu[$2]++; und[$2, nu[$2]] = $3; next }
    # T and C lines for an object come after its N/D/U lines: record torch definitions late.
    $1 == "T" { torch[$2] = 1; for (i = 1; i <= nd[$2]; i++) tdef[def[$2, i]] = 1; next }
    $1 == "C" { cand[$2] = 1; next }
    END {
      do {
        # The objects still loaded: breadth-first from the program, not into replaced ones.
        split("", kept); split("", queue); head = 1; tail = 1; queue[1] = "@program"
        kept["@program"] = 1
        while (head <= tail) {
          o = queue[head++]
          if (o in stub) continue
          for (i = 1; i <= nn[o]; i++) {
            d = need[o, i]
            if (!(d in kept)) { kept[d] = 1; queue[++tail] = d }
          }
        }
        split("", ref)
        for (o in kept) if (!(o in stub)) for (i = 1; i <= nu[o]; i++) ref[und[o, i]] = 1
        added = 0
        for (l in cand) {
          if ((l in stub) || !(l in kept)) continue
          ok = 1
          for (i = 1; ok && i <= nd[l]; i++) if (def[l, i] in ref) ok = 0
          for (i = 1; ok && i <= nu[l]; i++) if (und[l, i] in tdef) ok = 0
          if (ok) { stub[l] = 1; added++ }
        }
      } while (added > 0)
      # Only those still reached: a library dropped with the one that loaded it needs no link.
      for (l in stub) if (l in kept) print l
    }' | sort
}

cmd="${1:-}"
case "$cmd" in
  make)
    [ $# -eq 4 ] || die "usage: unused-libs.sh make PROGRAM STUB DIR"
    prog="$2"; stub="$3"; dir="$4"
    [ -f "$prog" ] || die "program '$prog' not found"
    [ -f "$stub" ] || die "stub library '$stub' not found"
    rm -rf "$dir"  # before ldd: the program's RPATH points here
    mkdir -p "$dir"
    : >"$dir/manifest.txt"
    if ! command -v ldd >/dev/null || ! command -v readelf >/dev/null; then
      echo "warning: unused-libs: ldd or readelf missing: every library is loaded" >&2
      exit 0
    fi
    # What the loader maps with the folder empty: the libraries' real paths.
    if ! list=$(loaded "$prog") || [ -z "$list" ]; then
      echo "warning: unused-libs: ldd found no libraries of '$prog': every library is loaded" >&2
      exit 0
    fi
    if ! names=$(analyse "$prog" "$list"); then
      echo "warning: unused-libs: analysis of '$prog' failed: every library is loaded" >&2
      : >"$dir/manifest.txt"
      exit 0
    fi
    total=$(wc -l <<<"$list")
    stub_name=$(basename "$stub")
    cp "$stub" "$dir/$stub_name"
    declare -A real=()
    while IFS=$'\t' read -r name path; do real[$name]="$path"; done <<<"$list"
    n=0
    for name in $names; do
      case "$name" in */*|"$stub_name") continue ;; esac
      # A copy where the file system has no symbolic links (the loader then maps each copy).
      ln -s "$stub_name" "$dir/$name" 2>/dev/null || cp "$dir/$stub_name" "$dir/$name"
      printf '%s\t%s\n' "$name" "${real[$name]}" >>"$dir/manifest.txt"
      n=$((n + 1))
    done
    # The analysis models the loader; the check asks the loader itself (ldd) about the folder
    # just made. Where they disagree (say a library with a RUNPATH of its own still loads a
    # replaced one for real, bringing its dependencies back), everything is loaded instead.
    if [ "$n" -gt 0 ] && ! bash "$0" check "$prog" "$dir" >/dev/null; then
      echo "warning: unused-libs: the folder failed its check (above): every library is loaded" >&2
      rm -rf "$dir" && mkdir -p "$dir" && : >"$dir/manifest.txt"
      exit 0
    fi
    echo "unused-libs: $n of $total libraries $(basename "$prog") loads replaced by $stub_name" \
      "($(loaded "$prog" | wc -l) loaded now)"
    ;;
  check)
    expect_some=0
    if [ "${2:-}" = "--expect-some" ]; then expect_some=1; shift; fi
    [ $# -eq 3 ] || die "usage: unused-libs.sh check [--expect-some] PROGRAM DIR"
    prog="$2"; dir="$3"
    [ -f "$dir/manifest.txt" ] || die "'$dir/manifest.txt' not found (build the program first)"
    list=$(loaded "$prog")
    if [ ! -s "$dir/manifest.txt" ]; then
      [ "$expect_some" = 0 ] || die "'$dir/manifest.txt' is empty: no library was replaced"
      echo "unused-libs: no library replaced; $(wc -l <<<"$list") objects loaded"
      exit 0
    fi
    dir_real=$(cd "$dir" && pwd -P)
    # The loader maps the stub once: ldd lists it under the first name asked for, and every
    # later name only finds it loaded. A replaced name must not be listed with another path.
    declare -A real_loaded=()
    n_stub=0
    while IFS=$'\t' read -r name path; do
      if [ "$(dirname "$(realpath "$path")")" = "$dir_real" ]; then
        n_stub=$((n_stub + 1))
      else
        real_loaded[$name]="$path"
      fi
    done <<<"$list"
    bad=0
    {
      [ "$n_stub" -gt 0 ] || echo "E	no library is loaded from $dir"
      while IFS=$'\t' read -r name path; do
        [ -z "${real_loaded[$name]:-}" ] ||
          { echo "E	$name is loaded from ${real_loaded[$name]}, not from $dir"; continue; }
        [ -f "$path" ] || { echo "E	$name: the library it replaces, '$path', is gone"; continue; }
        elf_table "$name" "$path" | awk -F'\t' '$1 != "N" { print "R" $0 }'
      done <"$dir/manifest.txt"
      elf_table "@program" "$prog" | awk -F'\t' '$1 == "U"'
      while IFS=$'\t' read -r name path; do
        [ -n "${real_loaded[$name]:-}" ] || continue
        elf_table "$name" "$path" | awk -F'\t' -v t="$(is_torch "$name" && echo 1)" '
          $1 == "U" { print } $1 == "D" && t == "1" { print "T\t" $2 "\t" $3 }'
      done <<<"$list"
    } | awk -F'\t' '
      $1 == "E" { print "error: unused-libs: " $2; bad = 1; next }
      $1 == "RD" { rdef[$3] = rdef[$3] " " $2; next }   # defined by a replaced library
      $1 == "RU" { n++; rl[n] = $2; ru[n] = $3; next }   # a replaced library calls it
      $1 == "U" { if ($3 in rdef) { print "error: unused-libs: " $2 " takes " $3 " from" rdef[$3]; bad = 1 }; next }
      $1 == "T" { tdef[$3] = $2; next }
      END {
        for (i = 1; i <= n; i++) if (ru[i] in tdef) {
          print "error: unused-libs: " rl[i] " calls " ru[i] " of " tdef[ru[i]]; bad = 1
        }
        exit bad
      }' || bad=1
    [ "$bad" = 0 ] || exit 1
    echo "unused-libs: $(wc -l <"$dir/manifest.txt") replaced libraries, none used;" \
      "$(wc -l <<<"$list") objects loaded"
    ;;
  *) die "usage: unused-libs.sh make PROGRAM STUB DIR | check [--expect-some] PROGRAM DIR" ;;
esac
