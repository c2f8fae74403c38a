#!/usr/bin/env bash
# The GPU check: one prepared run on a lent GPU machine, inside its time budget.
#
#   here:   bash tools/install.sh && bash tools/device/stage.sh
#   there:  the device tool's run(command="bash tools/device/check.sh", carry=[".device"], timeout_s=600)
#   or on any CUDA machine with PyTorch: bash tools/device/check.sh   (results in results/device/)
#
# Steps, most important first, each in its own time limit and all inside CHECK_BUDGET_S
# (default 300 s, which leaves a 15-minute device lease time to start the machine and run
# again; a step that would start with under 30 s left is skipped and says so); CHECK_STEPS
# (names, space-separated) runs only those, e.g. the ones a first run skipped:
#   tests     the CUDA variants of the operator tests and the whole-model accelerator tests
#   m2f_640, m2f_640_fp16, m2f_1024_fp16, dpt_fp16, dpt, m2f_640_fp16_compile, backbones
#             tools/benchmark_model.py / benchmark_backbone.py, random weights, published settings
# Writes $OUT/summary.md (each step's exit status and time, then every benchmark's table) and
# $OUT/device_check.tar.gz (every step's log, .md and .json), $OUT being the device tool's
# output folder (default results/device). Exits 0 when every step that ran passed.
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
out="${OUT:-$repo/results/device}"
mkdir -p "$out"
work="$(mktemp -d)"
budget="${CHECK_BUDGET_S:-300}"
start=$(date +%s)
py="${PYTHON:-python3}"
[ -d "$repo/.device/site" ] && export PYTHONPATH="$repo/.device/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
summary="$work/summary.md"
failed=0
M2F=projects/Mask2Former/configs/coco/panoptic-segmentation/swin/maskformer2_hourglass_swin_large_IN21k_384_bs16_100ep.yaml
DPT=projects/DPT/configs/dpt_hybrid_nyuv2_expedit_a4_16x16.yaml

printf '# expedit-d2 GPU check, %s, commit %s\n\n| step | result | seconds |\n|---|---|---:|\n' \
    "$(date -u +%Y-%m-%dT%H:%MZ)" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" > "$summary"

step() {  # step NAME LIMIT_S COMMAND...: run it with its output in NAME.log, within the budget
    local name=$1 limit=$2 left rc t0
    shift 2
    if [ -n "${CHECK_STEPS:-}" ] && [[ " $CHECK_STEPS " != *" $name "* ]]; then
        echo "| $name | not in CHECK_STEPS | |" >> "$summary"
        return
    fi
    left=$(( budget - ($(date +%s) - start) - 15 ))
    if (( left < 30 )); then
        echo "| $name | skipped: ${left} s left of the ${budget} s budget | |" >> "$summary"
        return
    fi
    (( limit > left )) && limit=$left
    echo "== $name (at most ${limit} s)"
    t0=$(date +%s)
    timeout "$limit" "$@" > "$work/$name.log" 2>&1
    rc=$?
    (( rc != 0 )) && failed=1
    echo "| $name | rc $rc$( (( rc == 124 )) && echo ', timed out') | $(( $(date +%s) - t0 )) |" >> "$summary"
    tail -n 12 "$work/$name.log"
}

bench() {  # bench NAME LIMIT_S ARGS...: tools/benchmark_model.py, output NAME.md / NAME.json
    local name=$1 limit=$2
    shift 2
    step "$name" "$limit" "$py" tools/benchmark_model.py "$@" --output "$work/$name" MODEL.WEIGHTS ""
}

step env 60 bash -c "nvidia-smi -L; $py -c 'import sys, torch, detectron2, fvcore; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name(0)); print(\"detectron2\", detectron2.__version__)'"
step tests 150 "$py" -m pytest -q -p no:cacheprovider tests/test_ops.py tests/test_methods_ops.py \
    tests/test_accelerator_models.py -k cuda
bench m2f_640 90 --config-file $M2F --input-size 640 640 --repeats 20
bench m2f_640_fp16 90 --config-file $M2F --input-size 640 640 --repeats 20 --amp fp16
bench m2f_1024_fp16 120 --config-file $M2F --input-size 1024 1024 --repeats 20 --amp fp16
bench dpt_fp16 60 --config-file $DPT --input-size 480 640 --repeats 20 --amp fp16
bench dpt 60 --config-file $DPT --input-size 480 640 --repeats 20
bench m2f_640_fp16_compile 240 --config-file $M2F --input-size 640 640 --repeats 10 --amp fp16 --compile backbone
step backbones 120 "$py" tools/benchmark_backbone.py --cases swin_l_640 swin_l_1024 vit_hybrid_640x480 \
    --repeats 10 --no-memory --output "$work/backbones"

for table in "$work"/*.md; do
    [ "$table" = "$summary" ] && continue
    printf '\n## %s\n\n' "$(basename "$table" .md)" >> "$summary"
    cat "$table" >> "$summary"
done
cp "$summary" "$out/summary.md"
tar czf "$out/device_check.tar.gz" -C "$work" .
echo "== done in $(( $(date +%s) - start )) s: $out/summary.md, $out/device_check.tar.gz"
cat "$summary"
exit $failed
