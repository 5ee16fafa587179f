#!/usr/bin/env bash
# The decoder's GPU check, in one call on a machine with a CUDA GPU (< 8 minutes):
#   1. the decoder tests (losslessness and the rest of tests/decode) with DSPARK_TEST_DEVICE=cuda;
#   2. the bench table on the built-in pair (tiny-code / tiny-code-draft-s), bf16;
#   3. the bench table on a randomly initialised ~1B target / ~111M draft pair (memory-bound target), bf16;
#   4. the server's concurrency goal (bench_serve.py, 8 clients vs 1) on the built-in pair, bf16, when
#      fastapi, uvicorn and httpx are importable (carry their wheels in .whl/ otherwise).
# Logs and JSON reports go to $OUT when set (the device tool's folder), else runs/gpu_check/.
#
#   bash benchmarks/gpu_check.sh                     # on the GPU machine
#   bash benchmarks/gpu_check.sh --device cpu --tiny # dry run of the same steps on CPU at toy sizes
#
# Python: .venv/bin/python when it exists, else python3 with this checkout on PYTHONPATH (a GPU image
# with torch and transformers preinstalled); wheels in .whl/ are installed to /tmp/dspark-site first.
# The stories260K tests need ../shared/models/stories260K; when only .gpu_carry/stories260K came
# along (see benchmarks/README.md), it is copied there. A step that fails does not stop the others;
# the exit code is the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
TINY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --tiny) TINY=1; shift ;;
    *) echo "gpu_check: unknown argument $1 (use --device D, --tiny)" >&2; exit 2 ;;
  esac
done
RESULTS=${OUT:-runs/gpu_check}
mkdir -p "$RESULTS"
SUMMARY="$RESULTS/summary.txt"
: > "$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }

if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  # by name from .whl/: pip picks the wheel built for this python (.whl/ may hold several builds of
  # a binary package such as pydantic-core)
  names=$(ls .whl/*.whl | sed 's#.*/##; s/-.*//' | sort -u)
  # shellcheck disable=SC2086
  "$PY" -m pip install -q --no-index --find-links .whl --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/dspark-site $names && export PYTHONPATH=/tmp/dspark-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DSPARK_TEST_DEVICE=$DEVICE

if ! "$PY" - "$DEVICE" <<'EOF' 2>&1 | tee -a "$SUMMARY"; then
import importlib, sys
missing = [m for m in ("torch", "transformers", "safetensors", "tokenizers", "yaml", "typer", "rich", "pytest")
           if importlib.util.find_spec(m) is None]
if missing:
    print("gpu_check: missing python modules: " + ", ".join(missing) + " (carry wheels in .whl/, see benchmarks/README.md)")
    sys.exit(1)
import torch, transformers
dev = sys.argv[1]
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, device {dev}")
if dev.startswith("cuda"):
    if not torch.cuda.is_available():
        print("gpu_check: CUDA requested but torch sees no GPU"); sys.exit(1)
    print("gpu:", torch.cuda.get_device_name(0))
for opt in ("xgrammar", "pydantic"):
    if importlib.util.find_spec(opt) is None:
        print(f"note: {opt} missing: tests that need it fail to collect and are reported, the rest run")
EOF
  note "gpu_check: environment not usable"; exit 10
fi

STORIES=../shared/models/stories260K
if [ ! -d "$STORIES" ] && [ -d .gpu_carry/stories260K ]; then
  mkdir -p ../shared/models && cp -r .gpu_carry/stories260K "$STORIES"
fi
[ -d "$STORIES" ] || note "note: $STORIES missing: the stories260K tests will fail or skip"

failed=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $RESULTS/NAME.log
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$RESULTS/$name.log" 2>&1
  local rc=$?
  note "step $name: exit $rc in $((SECONDS - t0)) s (log: $name.log)"
  [ $rc -eq 0 ] || failed=$((failed + 1))
  tail -n 40 "$RESULTS/$name.log"
}

if [ $TINY -eq 1 ]; then
  TESTS=${GPU_CHECK_TESTS:-tests/decode/test_analysis.py}
  BENCH_ARGS=(--n 2 --max-new-tokens 8 --ks 1,2 --batch-sizes 1,2 --cost-reps 2)
  PAIR=tiny
  DTYPE=float32
  LIMITS=(600 600 600 600)  # a loaded 2-core CPU, not the GPU budget
  SERVE_ARGS=(--requests 1 --max-tokens 8)
else
  TESTS=${GPU_CHECK_TESTS:-tests/decode}
  BENCH_ARGS=(--n 10 --max-new-tokens 64 --ks 1,2,4,6,8 --batch-sizes 1,4,8)
  PAIR=1b
  DTYPE=bfloat16
  LIMITS=(210 90 120 90)  # seconds: tests, built-in bench, random-pair bench, serve (< 9 minutes in all)
  SERVE_ARGS=()
fi

# shellcheck disable=SC2086
step tests "${LIMITS[0]}" "$PY" -m pytest $TESTS -q -p no:cacheprovider --continue-on-collection-errors
grep -E "passed|failed|error" "$RESULTS/tests.log" | tail -n 1 | sed 's/^/tests: /' >> "$SUMMARY"
if [ -d dspark/models/builtin/tiny-code ] || [ $TINY -eq 1 ]; then
  TARGET=tiny-code
  [ -d dspark/models/builtin/tiny-code ] || TARGET=tiny-code-draft-m  # dry run before the target exists
  step bench_builtin "${LIMITS[1]}" "$PY" benchmarks/bench_decoder.py --target "$TARGET" --draft tiny-code-draft-s \
    --device "$DEVICE" --dtype "$DTYPE" "${BENCH_ARGS[@]}" --out "$RESULTS/bench_builtin.json"
else
  note "step bench_builtin: skipped (dspark/models/builtin/tiny-code missing)"
fi
step bench_random "${LIMITS[2]}" "$PY" benchmarks/bench_decoder.py --random-pair "$PAIR" \
  --device "$DEVICE" --dtype "$DTYPE" "${BENCH_ARGS[@]}" --out "$RESULTS/bench_random_$PAIR.json"

if "$PY" -c "import fastapi, uvicorn, httpx" 2>/dev/null && \
    { [ -d dspark/models/builtin/tiny-code ] || [ $TINY -eq 1 ]; }; then
  step bench_serve "${LIMITS[3]}" "$PY" benchmarks/bench_serve.py --target "${TARGET:-tiny-code}" \
    --draft tiny-code-draft-s --device "$DEVICE" --dtype "$DTYPE" "${SERVE_ARGS[@]}" --json
else
  note "step bench_serve: skipped (needs fastapi, uvicorn and httpx, and the built-in tiny-code)"
fi

note "gpu_check: $failed failed step(s); results in $RESULTS"
exit $failed
