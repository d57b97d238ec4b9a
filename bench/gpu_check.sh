#!/usr/bin/env bash
# The GPU check: everything a lent GPU should tell us, in one run of at most 8 minutes on one H100/H200.
#
#   bench/gpu_check.sh --prepare DIR       # beforehand, on any CPU: the data (35 MB; see bench/gpu_check.py)
#   bench/gpu_check.sh [--data DIR] OUT    # on the GPU host; DIR defaults to gpu-check-data/ in the checkout
#   bench/gpu_check.sh --cpu-smoke OUT     # every section at toy size on CPU (CI runs it): exit 1 if one breaks
#
# Sections, each under its own timeout, each appending JSON lines to OUT/gpu_check.jsonl (a line per
# result as soon as it exists, then {"section": ..., "status": "ok"|"failed"|"timeout"}), logs in OUT/logs/:
#   doctor      artscale doctor --need cuda --json: its exit code and report
#   pytest_gpu  pytest -m gpu: passed, failed, skipped
#   train       artscale train alone, bf16, 60 steps after 10 of warm-up: the article's model at batch 32 and
#               128, the small UNet at 128 px batch 64 with channels_last on and off; each fed by the loader
#               and by batches made on the device (bench/train_step.py --variants)
#   ddp         one DDP rank on NCCL under torchrun, USR1 at step 10, exit 75, resumed from its step
#   generate    the article's model over the JPEG tree: the pipeline against onnxruntime alone and the
#               CPU decode and encode ceiling (bench/generate.py)
#   sample      the small UNet's fp32 and fp16 ONNX against onnxruntime alone on bound buffers, and the
#               run dir on torch (bench/sample.py --onnx --run)
# Exit status: 0 when every section is ok, else 1 (the JSONL says which). On CPU the GPU-only parts
# write {"status": "skipped", "reason": "skipped: no CUDA"}.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
HELPER=$ROOT/bench/gpu_check.py

usage() { sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

mode=gpu
data=$ROOT/gpu-check-data
case "${1:-}" in
    --prepare) [ $# -eq 2 ] || usage; exec "$PY" "$HELPER" prepare "$2" ;;
    --cpu-smoke) mode=smoke; shift ;;
    --data) [ $# -ge 2 ] || usage; data=$2; shift 2 ;;
    -h | --help | "") usage ;;
esac
[ $# -eq 1 ] || usage
out=$1
mkdir -p "$out/logs" "$out/work" || exit 2
out=$(cd "$out" && pwd)
jsonl=$out/gpu_check.jsonl
work=$out/work
started=$SECONDS
failed=()

# section NAME SECONDS COMMAND...: COMMAND under its own timeout (killed 5 s after, if need be),
# output to logs/NAME.log, then the section's status line.
section() {
    local name=$1 limit=$2 begin=$SECONDS rc=0
    shift 2
    echo "gpu_check: $name (at most ${limit}s)" >&2
    timeout -k 5 "$limit" "$@" >"$out/logs/$name.log" 2>&1 || rc=$?
    "$PY" "$HELPER" status --jsonl "$jsonl" --section "$name" --rc "$rc" --wall $((SECONDS - begin)) \
        --limit "$limit" --log "$out/logs/$name.log"
    [ "$rc" -eq 0 ] || failed+=("$name")
}

skipped() {  # NAME WHAT: a GPU-only part that CPU cannot run
    printf '{"section": "%s", "part": "%s", "status": "skipped", "reason": "skipped: no CUDA"}\n' "$1" "$2" >>"$jsonl"
}

if [ "$mode" = smoke ]; then
    # Toy size: 16 px, the tiny denoiser, a few steps. The data is made fresh, inside the smoke's time.
    data=$work/data
    section prepare 240 "$PY" "$HELPER" prepare "$data" --toy
    limits=(doctor=60 pytest_gpu=120 train=240 ddp=180 generate=180 sample=180)
    variants=article:4,tiny:4:cl  # the GPU run's variants, one of each model; nocl is the same path
    train_args=(--steps 1 --warmup 1 --precision no)
    ddp_args=(--batch-size 4 --signal-at 3)
    gen_args=(--repeat 2 --article-images 4 --device cpu)
    sample_args=(--images 4 --batch-size 2 --steps 2 --device cpu)
else
    [ -f "$data/prepared.json" ] || { echo "gpu_check: no prepared data in $data: run bench/gpu_check.sh --prepare $data first" >&2; exit 2; }
    limits=(doctor=30 pytest_gpu=110 train=140 ddp=60 generate=45 sample=60)
    variants=article:32,article:128,small:64:cl,small:64:nocl
    train_args=(--steps 60 --warmup 10)
    ddp_args=(--batch-size 32 --signal-at 10)
    gen_args=(--repeat 20 --ceiling-images 300 --article-images 60 --device cuda)
    sample_args=(--images 128 --batch-size 64 --steps 20 --device cuda)
fi
declare -A limit
for kv in "${limits[@]}"; do limit[${kv%=*}]=${kv#*=}; done
size=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["image_size"])' "$data/prepared.json") || exit 1
small=$work/small
"$PY" "$HELPER" unpack "$data" "$work" >/dev/null || exit 1
flag=()
[ "$mode" = smoke ] && flag=(--smoke)
"$PY" "$HELPER" start --jsonl "$jsonl" --mode "$mode" --data "$data" || exit 1

section doctor "${limit[doctor]}" "$PY" "$HELPER" doctor --jsonl "$jsonl" "${flag[@]}"
section pytest_gpu "${limit[pytest_gpu]}" "$PY" "$HELPER" pytest-gpu --jsonl "$jsonl" --work "$work" "${flag[@]}"
section train "${limit[train]}" "$PY" "$ROOT/bench/train_step.py" --variants "$variants" --shards "$data/shards" \
    --size "$size" --work "$work/train" --jsonl "$jsonl" "${train_args[@]}"
[ "$mode" = smoke ] && skipped train "bf16 on CUDA, peak memory, share of the bf16 peak"
section ddp "${limit[ddp]}" "$PY" "$HELPER" ddp --data "$data" --work "$work" --jsonl "$jsonl" \
    "${ddp_args[@]}" "${flag[@]}"
[ "$mode" = smoke ] && skipped ddp "NCCL (gloo instead)"
section generate "${limit[generate]}" "$PY" "$ROOT/bench/generate.py" --input "$data/jpegs" --size "$size" \
    --jsonl "$jsonl" "${gen_args[@]}"
[ "$mode" = smoke ] && skipped generate "CUDA provider"
section sample "${limit[sample]}" "$PY" "$ROOT/bench/sample.py" --onnx "$small/fp32.onnx,$small/fp16.onnx" \
    --run "$small/run" --jsonl "$jsonl" "${sample_args[@]}"
[ "$mode" = smoke ] && skipped sample "CUDA provider and torch CUDA"

echo "gpu_check: $((SECONDS - started)) s; results in $jsonl" >&2
if [ ${#failed[@]} -gt 0 ]; then
    echo "gpu_check: failed: ${failed[*]} (see $out/logs/)" >&2
    grep -E '"status": "(failed|timeout)"' "$jsonl" >&2
    exit 1
fi
