#!/usr/bin/env bash
# Runs the SPEED paper's erasure configurations (SPEC §1.4) with the built-in presets:
#   instance: Snoopy; Snoopy, Mickey; Snoopy, Mickey, Spongebob      (preset instance)
#   style:    Van Gogh; Picasso; Monet                                (preset style)
#   celebrity: the 10 / 50 / 100 type=erase rows of N_celebrity.csv   (preset celebrity)
#   nudity                                                            (preset nudity)
# and writes <name>.<ext> + <name>.json (the report) per configuration into OUT_DIR.
#
# usage: scripts/reproduce-paper.sh MODEL DATA_DIR OUT_DIR [extra speed-erase options...]
#   MODEL     a checkpoint (.safetensors file or diffusers folder), e.g. sd-v1-4.safetensors
#   DATA_DIR  the SPEED data files (instance.csv, style.csv, N_celebrity.csv), e.g.
#             a checkout of github.com/Ouxiang-Li/SPEED's data/ folder
#   OUT_DIR   created if missing
# environment: SPEED_ERASE (the binary; default: speed-erase on PATH, else build/speed-erase),
#              FORMAT (edited | full | pt | lora; default edited: the reference's own output),
#              ONLY (a regular expression: run only the matching configuration names).
# Every configuration runs even if an earlier one failed; the exit status is 1 if any failed.
set -uo pipefail

if [[ $# -lt 3 ]]; then
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
model=$1 data=$2 out=$3
shift 3
extra=("$@")

root=$(cd "$(dirname "$0")/.." && pwd)
bin=${SPEED_ERASE:-}
if [[ -z $bin ]]; then
  if command -v speed-erase >/dev/null 2>&1; then bin=speed-erase; else bin=$root/build/speed-erase; fi
fi
format=${FORMAT:-edited}
case $format in
  full | edited | lora) ext=safetensors ;;
  pt) ext=pt ;;
  *) echo "error: FORMAT '$format' is not one of full, edited, pt, lora" >&2; exit 2 ;;
esac
[[ -e $model ]] || { echo "error: model '$model' does not exist" >&2; exit 2; }
[[ -d $data ]] || { echo "error: data folder '$data' does not exist" >&2; exit 2; }
mkdir -p "$out" || exit 1

# name | options (one string, split on '|' below)
configs=(
  "instance_1|--preset instance|--concept Snoopy"
  "instance_2|--preset instance|--concept Snoopy|--concept Mickey"
  "instance_3|--preset instance|--concept Snoopy|--concept Mickey|--concept Spongebob"
  "style_van_gogh|--preset style|--concept Van Gogh"
  "style_picasso|--preset style|--concept Picasso"
  "style_monet|--preset style|--concept Monet"
  "celebrity_10|--preset celebrity|--concepts 10_celebrity.csv:concept:type=erase"
  "celebrity_50|--preset celebrity|--concepts 50_celebrity.csv:concept:type=erase"
  "celebrity_100|--preset celebrity|--concepts 100_celebrity.csv:concept:type=erase"
  "nudity|--preset nudity"
)

failed=()
summary=()
for entry in "${configs[@]}"; do
  IFS='|' read -r -a parts <<<"$entry"
  name=${parts[0]}
  if [[ -n ${ONLY:-} && ! $name =~ $ONLY ]]; then continue; fi
  args=()
  for p in "${parts[@]:1}"; do
    # "--concept Van Gogh" -> two words: the option and its (space-containing) value.
    args+=("${p%% *}" "${p#* }")
  done
  target=$out/$name.$ext
  report=$out/$name.json
  echo "== $name" >&2
  start=$(date +%s.%N)
  if "$bin" erase --model "$model" --data-dir "$data" "${args[@]}" --format "$format" \
      --output "$target" --report "$report" --force "${extra[@]}"; then
    secs=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')
    summary+=("$name: ok (${secs} s) -> $target")
  else
    status=$?
    failed+=("$name")
    summary+=("$name: FAILED (exit $status)")
  fi
done

echo >&2
printf '%s\n' "${summary[@]}" >&2
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "error: ${#failed[@]} configuration(s) failed: ${failed[*]}" >&2
  exit 1
fi
