#!/usr/bin/env bash
# A CI-style batch: erase one concept list from several models, check every exit status and the
# JSON report of every run, and fail the job if anything is off.
#
# usage: scripts/ci-example.sh CONCEPTS OUT_DIR MODEL... [-- extra speed-erase options...]
#   CONCEPTS  a concept file (one per line, `target => anchor` for a per-target anchor) or
#             FILE.csv:COLUMN
#   OUT_DIR   created if missing; gets <model name>.lora.safetensors + <model name>.json
# environment: SPEED_ERASE (the binary; default: speed-erase on PATH, else build/speed-erase),
#              FORMAT (default lora: small outputs, one per model).
# Checks per model: exit status 0; the report parses; family/layout present; every edited layer
# has null_dim > 0 and, with --lambda 0 (the default), an IEC residual below 1e-6; the output
# exists and its safetensors header begins with {" and embeds the report. Then one deliberate
# usage error must exit with status 2. Uses python3 for the JSON checks (jq works the same way).
set -uo pipefail

if [[ $# -lt 3 ]]; then
  sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
concepts=$1 out=$2
shift 2
models=()
while [[ $# -gt 0 && $1 != -- ]]; do models+=("$1"); shift; done
[[ ${1:-} == -- ]] && shift
extra=("$@")

root=$(cd "$(dirname "$0")/.." && pwd)
bin=${SPEED_ERASE:-}
if [[ -z $bin ]]; then
  if command -v speed-erase >/dev/null 2>&1; then bin=speed-erase; else bin=$root/build/speed-erase; fi
fi
format=${FORMAT:-lora}
py=python3
[[ -x /usr/bin/python3 ]] && py=/usr/bin/python3
mkdir -p "$out" || exit 1

failures=0
for model in "${models[@]}"; do
  name=$(basename "${model%/}")
  name=${name%.safetensors}
  output=$out/$name.$format.safetensors
  [[ $format == pt ]] && output=$out/$name.pt
  report=$out/$name.json
  "$bin" erase --model "$model" --concepts "$concepts" --format "$format" --output "$output" \
    --report "$report" --force -q "${extra[@]}"
  status=$?
  if [[ $status -ne 0 ]]; then
    echo "FAIL $name: speed-erase exited with status $status" >&2
    failures=$((failures + 1))
    continue
  fi
  if ! "$py" - "$report" "$output" "$format" <<'EOF'; then
import json, struct, sys
report_path, output, fmt = sys.argv[1:4]
r = json.load(open(report_path))
problems = []
for key in ("tool", "input", "options", "concepts", "layers", "summary", "timings", "output"):
    if key not in r:
        problems.append(f"report has no '{key}'")
layers = r.get("layers", [])
if not layers:
    problems.append("no layer was edited")
lam = r.get("options", {}).get("lambda", 0)
for l in layers:
    if l.get("null_dim", 0) <= 0:
        problems.append(f"layer {l['name']}: empty null space")
    if lam == 0 and r["options"].get("iec", True) and (l.get("iec_residual") or 0) > 1e-6:
        problems.append(f"layer {l['name']}: IEC residual {l['iec_residual']:.3g} > 1e-6")
if fmt != "pt":
    with open(output, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = f.read(n)
    if not header.startswith(b'{"'):
        problems.append("output header does not begin with {\"")
    meta = json.loads(header).get("__metadata__", {})
    if "speed_erase.report" not in meta:
        problems.append("output does not embed the report")
for p in problems:
    print("  " + p, file=sys.stderr)
s = r.get("summary", {})
print(f"ok   {r['input']['path']}: {r['input']['family']} {r['input']['layout']}, "
      f"{s.get('layers_edited')} layers, null dims {s.get('null_dim_min')}..{s.get('null_dim_max')}, "
      f"max |dW|/|W| {s.get('rel_dw_max', 0):.3g}, {r['timings']['total']:.2f} s")
sys.exit(1 if problems else 0)
EOF
    echo "FAIL $name: report checks failed ($report)" >&2
    failures=$((failures + 1))
  fi
done

# A misspelt option must be a usage error (exit 2), which a CI job can tell from a failed edit.
"$bin" erase --model "${models[0]}" --concepts "$concepts" --threshhold 0.1 >/dev/null 2>&1
status=$?
if [[ $status -ne 2 ]]; then
  echo "FAIL usage error exited with status $status, expected 2" >&2
  failures=$((failures + 1))
else
  echo "ok   a misspelt option exits with status 2"
fi

if [[ $failures -gt 0 ]]; then
  echo "error: $failures check(s) failed" >&2
  exit 1
fi
echo "all ${#models[@]} model(s) passed"
