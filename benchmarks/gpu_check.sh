#!/usr/bin/env bash
# The checks that need a GPU, in one run that fits a short GPU loan (about 7 minutes on an H200).
#
# CI has no GPU, so this is what a session with a lent GPU runs, once, and records:
#   1. tests/test_cuda.py: compact inputs normalise to the CPU's bits, losses and gradients match
#      the CPU's, bf16 autocast, fused AdamW, torch.compile, a pinned-memory pre-training run that
#      stops and resumes to the same weights, fine-tuning on top, k-means on the GPU;
#   2. pcav bench, bf16, the paper's ViT-B (pretrain_audioset) at batch 96: plain vs fast step and
#      MFU against the matmul peak measured in the same run, plus the E-step's k-means of
#      2,000,000 x 256 features into 5,000 clusters;
#   3. the same step with train.compile=true.
# Each part has its own time limit, so a slow one does not take the others' results with it.
#
# On the `device` tool's machines python3 already holds torch, typer, rich, pyyaml, safetensors
# and pytest; ffmpeg-python (imported by the CLI) travels as wheels in .whl/ (ignored by git):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp -d .whl ffmpeg-python==0.2.0 future==1.0.0
# then call the tool's run with command "bash benchmarks/gpu_check.sh", carry [".whl"] and
# timeout_s 560. Results land in $OUT (or /tmp/gpu_check): env.txt, tests.txt, bench_eager.md,
# bench_compile.md. Elsewhere: PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh.
set -u
OUT=${OUT:-/tmp/gpu_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available())'
    nproc
} 2>&1 | tee "$OUT/env.txt"

part() {  # part SECONDS NAME COMMAND...: run with a time limit, say how it ended
    local limit=$1 name=$2 start=$SECONDS
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@"
    echo "== $name: exit $? after $((SECONDS - start)) s"
}

part 200 "CUDA tests" "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py 2>&1 | tee "$OUT/tests.txt"

# A dry run of the script's plumbing on a CPU: DEVICE=cpu RECIPE=demo BATCH=2 STEPS=1 ESTEP_N=20000
BENCH=("$PY" -m pcavmae_cli bench --recipe "${RECIPE:-pretrain_audioset}" --device "${DEVICE:-cuda}"
       --batch "${BATCH:-96}" --steps "${STEPS:-10}" --precision bf16 --no-loader)
part 130 "bench, eager, E-step" "${BENCH[@]}" --estep-n "${ESTEP_N:-2000000}" --estep-d 256 \
    --append "$OUT/bench_eager.md" 2>&1 | tee -a "$OUT/bench.txt"
part 200 "bench, train.compile=true" "${BENCH[@]}" --no-estep --append "$OUT/bench_compile.md" \
    train.compile=true 2>&1 | tee -a "$OUT/bench.txt"
