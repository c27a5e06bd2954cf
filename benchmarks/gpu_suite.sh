#!/usr/bin/env bash
# The GPU measurements, in parts that each fit one call of a lent GPU machine (< 10 minutes on one H100; a
# session has 15 minutes of device time in all, start-up included: one or two parts). Run from the repository
# root with the machine's own python3 (torch, timm, safetensors, huggingface_hub, accelerate, pyyaml, scipy,
# tqdm, pytest and triton are in its image; attnxfer runs from the checkout, nothing is installed; its timm
# may be older than the 1.0.31 attnxfer needs: carry timm's wheel in .whl/, see docs/benchmarks.md):
#
#   bash benchmarks/gpu_suite.sh check      # CUDA-only tests and the CE paths in smoke mode (~3 min)
#   bash benchmarks/gpu_suite.sh transfer   # distillation step and loss: every CE path, N = 197 / 785 / 3137
#   bash benchmarks/gpu_suite.sh zoo        # efficient attentions vs flash SDPA, bf16, N = 197 / 785 / 3137
#   bash benchmarks/gpu_suite.sh models     # whole-model images/s: ViT-B teacher vs converted students, hybrids
#   bash benchmarks/gpu_suite.sh train      # `attnxfer train` images/s: plain fine-tune, copy, distill
#   bash benchmarks/gpu_suite.sh stage1     # conversion's stage-1 steps/s and CUDA syncs, before/after (~2 min)
#   bash benchmarks/gpu_suite.sh study      # a study of 4 ViT-Ti students from a ViT-B teacher vs their solo steps
#   bash benchmarks/gpu_suite.sh compiled   # the zoo and the models again under torch.compile (optional)
#
# In that order of priority: the first seven answer the GPU targets; `compiled` says whether compiling
# the feature maps pays on the GPU.
# Each part writes its JSON and log to ${OUT:-gpu-results}/ (the device tool's $OUT comes back to the
# caller). docs/benchmarks.md says what each figure is and where it goes.
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:-}
case "$PART" in check | transfer | zoo | models | train | stage1 | study | compiled) ;; *)
    echo "usage: bash benchmarks/gpu_suite.sh check|transfer|zoo|models|train|stage1|study|compiled" >&2
    exit 2
    ;;
esac
OUT=${OUT:-gpu-results}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
# A package the image lacks, or has in a version that fails, travels as a wheel in .whl/ (made here with
# `pip download --no-deps`, named in the device call's carry; docs/benchmarks.md): installed for this
# call into /tmp/site, ahead of the image's own.
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! "$PY" -c "import attnxfer.models, attnxfer.transfer, attnxfer.apps.run.training" 2>"$OUT/import.log"; then
    tail -3 "$OUT/import.log" >&2
    echo "attnxfer does not import with this machine's packages (timm >= 1.0.31 is needed): carry wheels," \
        "docs/benchmarks.md 'The GPU measurements: what to run'" >&2
    exit 3
fi
if ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then # each part times --device cuda
    echo "gpu_suite.sh measures a CUDA GPU and torch sees none here: run it on the lent GPU machine" \
        "(docs/benchmarks.md); on a CPU, run the benchmarks themselves with --device cpu" >&2
    exit 3
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
"$PY" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$OUT/device.txt"

run() {  # run NAME CMD...: tee the output to $OUT/NAME.log, remember a failure, go on with the next
    local name=$1
    shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "== $name FAILED (rc $rc)"; FAILED="$FAILED $name"; }
}
FAILED=""

case "$PART" in
check)
    # the tests whose CUDA cases exist only where CUDA does (flex backend, bf16 zoo on CUDA), then the CE
    # paths in smoke mode
    run tests "$PY" -m pytest -q -p no:cacheprovider tests/attention/test_attention_lse.py tests/objectives/test_losses.py \
        tests/attention/test_zoo_precision.py tests/attention/test_zoo_compile.py tests/training/test_throughput.py \
        tests/objectives/test_triton_ce.py
    run transfer_quick "$PY" benchmarks/transfer_step.py --device cuda --quick --tokens 197,785 \
        --ce-paths auto,rows,sdpa,attention_lse,triton,materialised
    ;;
transfer)
    run transfer_step "$PY" benchmarks/transfer_step.py --device cuda --pair small --tokens 197,785,3137 \
        --batch 64,16,4 --repeats 10 --warmup 3 --ce-paths auto,rows,sdpa,attention_lse,triton,materialised \
        --json "$OUT/transfer_step.json"
    run ce_loss "$PY" benchmarks/ce_loss.py --device cuda --tokens 197,785,3137 --batch 64,16,4 \
        --ce-paths rows,sdpa,triton --kernels --json "$OUT/ce_loss.json"
    ;;
zoo)
    run attention_zoo "$PY" benchmarks/attention_zoo.py --device cuda --dtype bfloat16 --tokens 197 785 3137 \
        --batch 256 64 16 --repeats 20 --warmup 5 --train --json "$OUT/attention_zoo.json"
    ;;
models)
    run model_throughput "$PY" benchmarks/model_throughput.py --preset gpu --json "$OUT/model_throughput.json"
    # what convert.attention=auto decides from: zoo and hybrids at 1,025 / 4,097 tokens, measured and predicted
    run hybrid_speed "$PY" benchmarks/hybrid_speed.py --device cuda --tokens 1025 4097 --batch 16 --repeats 10 \
        --json "$OUT/hybrid_speed.json"
    ;;
train)
    # eager and compiled in separate processes: each fits a call on its own if the pair does not
    run train_throughput_eager "$PY" benchmarks/train_throughput.py --preset gpu --compile eager \
        --json "$OUT/train_throughput_eager.json"
    run train_throughput_compiled "$PY" benchmarks/train_throughput.py --preset gpu --compile compiled \
        --json "$OUT/train_throughput_compiled.json"
    ;;
stage1)
    # stage 1 of conversion; the old loop beside it if stage1_before.py was made before the call
    # (git show dbb17a8:attnxfer/train/stage1.py > stage1_before.py: the machine's copy has no git history)
    baseline=()
    [ -f stage1_before.py ] && baseline=(--baseline stage1_before.py)
    run stage1_throughput "$PY" benchmarks/stage1_throughput.py --preset gpu "${baseline[@]}" \
        --json "$OUT/stage1_throughput.json"
    ;;
study)
    # the CPU table's setting (ViT-B/16 teacher, 4 ViT-Ti/16 students, 224 px) at a GPU batch, in bf16
    run study_step "$PY" benchmarks/study_step.py --device cuda --precision bf16 --batch 64 --repeats 5 \
        --ce-path auto --json "$OUT/study_step.json"
    ;;
compiled)
    linear="relu_linear elu_linear linformer hydra hedgehog performer cosformer"
    # shellcheck disable=SC2086
    run attention_zoo_compiled "$PY" benchmarks/attention_zoo.py --device cuda --dtype bfloat16 --tokens 3137 \
        --batch 16 --repeats 20 --warmup 5 --train --compile --no-unfused --attentions $linear agent window_linear \
        --json "$OUT/attention_zoo_compiled.json"
    # shellcheck disable=SC2086
    run model_throughput_compiled "$PY" benchmarks/model_throughput.py --preset gpu --compile \
        --attentions $linear --json "$OUT/model_throughput_compiled.json"
    ;;
esac
if [ -n "$FAILED" ]; then
    echo "failed parts:$FAILED"
    exit 1
fi
