#!/usr/bin/env bash
# One-shot check on a CUDA machine: GPU-marked tests, ResNet-19 T=4 training as train.py ships it (regional compile,
# CUDA graphs) and its resume (loading the saved compile artifacts) on a fabricated CIFAR-10, the cold-start benchmark
# on CUDA, the neuron benchmark and an evaluation with the cost report. Run from the repository root:
#     bash scripts/gpu_check.sh                 # ~6 minutes on one H200, most of it compilation
#     PY=python3 bash scripts/gpu_check.sh      # with an interpreter that has torch, einops, pytest, hypothesis
# Parts whose dependencies are missing (DALI, spikingjelly) are skipped with a line saying so. Every part runs even
# if an earlier one fails; the exit status is the number of failed parts.
set -u
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$HOME/.cache/glif2/inductor}
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/glif2_gpu_check}           # logs only: the device tool brings back a few files from here
WORK=${WORK:-/tmp/glif2_gpu_work}          # the fabricated dataset and the runs
PART_TIMEOUT=${PART_TIMEOUT:-240}          # seconds per part, so that one hang cannot use up a short lease
mkdir -p "$OUT" "$WORK"
failed=0
part() {  # part NAME COMMAND...: runs it, tees its output to $OUT/NAME.log, counts a failure
    local name=$1; shift
    echo "=== $name: $*"
    local start=$SECONDS
    if timeout "$PART_TIMEOUT" "$@" 2>&1 | tee "$OUT/$name.log"; [ "${PIPESTATUS[0]}" -eq 0 ]; then
        echo "=== $name: ok ($((SECONDS - start)) s)"
    else
        echo "=== $name: FAILED ($((SECONDS - start)) s)"; failed=$((failed + 1))
    fi
}
has() { $PY -c "import $1" 2>/dev/null; }

$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print(torch.__version__, torch.cuda.get_device_name())" \
    || exit 1

PART_TIMEOUT=${PYTEST_TIMEOUT:-170} part pytest-gpu $PY -m pytest -q -p no:cacheprovider -m gpu tests

# A fabricated CIFAR-10 (python-pickle release, 1280 train / 256 test images).
$PY - "$WORK/cifar" <<'PYEOF'
import sys, numpy as np
sys.path.insert(0, "tests")
from datasets_fixtures import write_cifar
rng = np.random.default_rng(0)
write_cifar(sys.argv[1], "cifar10", rng.integers(0, 256, (1280, 32, 32, 3), dtype=np.uint8),
            rng.integers(0, 10, 1280), rng.integers(0, 256, (256, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 256))
PYEOF
if has nvidia.dali; then BACKEND=dali; else BACKEND=torch; echo "=== DALI not installed: CIFAR through the torch backend"; fi
# train.py as shipped on CUDA: regional compilation with CUDA graphs (compile-mode auto); the resume loads the
# compile artifacts the first run saved after its epoch
TRAIN=(train.py --preset cifar10-resnet19-t4 --data-dir "$WORK/cifar" --backend "$BACKEND" --num-workers 2
       --batch-size 128 --eval-batch-size 256 --log-interval 5 --out-dir "$WORK/runs" --name r19 --no-tensorboard)
part train-resnet19-cudagraphs $PY "${TRAIN[@]}" --epochs 1
part resume-resnet19 $PY "${TRAIN[@]}" --epochs 2 --resume auto
part bench-compile $PY bench/compile.py --device cuda --models resnet19 --scopes regional model --kinds cold artifacts \
    --steps 10
part bench-neuron $PY bench/neuron.py --devices cuda --reps 3 --iters 5
PART_TIMEOUT=40 part eval-resnet19 $PY eval.py --checkpoint "$WORK/runs/r19/last.pt" --data-dir "$WORK/cifar" \
    --dataset cifar10 --report
if has nvidia.dali; then part bench-pipelines $PY bench/loaders.py; else echo "=== DALI not installed: bench-pipelines skipped"; fi
echo "gpu_check: $failed part(s) failed; logs in $OUT"
exit $failed
