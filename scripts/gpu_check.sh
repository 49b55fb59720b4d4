#!/usr/bin/env bash
# One-shot check on a CUDA machine: GPU-marked tests, compiled (reduce-overhead) ResNet-19 T=4 training steps on a
# fabricated CIFAR-10 set through the DALI GPU pipeline, and the three benchmarks. Run from the repository root:
#     bash scripts/gpu_check.sh            # ~5-10 minutes on one H200 (mostly compilation)
# Every part runs even if an earlier one fails; the exit status is the number of failed parts.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$HOME/.cache/glif2/inductor}
OUT=${OUT:-/tmp/glif2_gpu_check}
mkdir -p "$OUT"
failed=0
part() {  # part NAME COMMAND...: runs it, tees its output to $OUT/NAME.log, counts a failure
    local name=$1; shift
    echo "=== $name: $*"
    local start=$SECONDS
    if "$@" 2>&1 | tee "$OUT/$name.log"; then
        echo "=== $name: ok ($((SECONDS - start)) s)"
    else
        echo "=== $name: FAILED ($((SECONDS - start)) s)"; failed=$((failed + 1))
    fi
}

$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print(torch.__version__, torch.cuda.get_device_name())" \
    || exit 1

part pytest-gpu $PY -m pytest -q -p no:cacheprovider -m gpu

# A fabricated CIFAR-10 (python-pickle release, 2560 train / 512 test images) for the DALI GPU pipeline.
$PY - "$OUT/cifar" <<'PYEOF'
import sys, numpy as np
sys.path.insert(0, "tests")
from datasets_fixtures import write_cifar
rng = np.random.default_rng(0)
write_cifar(sys.argv[1], "cifar10", rng.integers(0, 256, (2560, 32, 32, 3), dtype=np.uint8),
            rng.integers(0, 10, 2560), rng.integers(0, 256, (512, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 512))
PYEOF
part train-resnet19-cudagraphs $PY train.py --preset cifar10-resnet19-t4 --data-dir "$OUT/cifar" --backend dali \
    --compile reduce-overhead --epochs 2 --batch-size 128 --eval-batch-size 256 --log-interval 5 \
    --out-dir "$OUT/runs" --name r19
part resume-resnet19 $PY train.py --preset cifar10-resnet19-t4 --data-dir "$OUT/cifar" --backend dali \
    --compile reduce-overhead --epochs 3 --batch-size 128 --eval-batch-size 256 --log-interval 5 \
    --out-dir "$OUT/runs" --name r19 --resume auto
part eval-resnet19 $PY eval.py --checkpoint "$OUT/runs/r19/last.pt" --data-dir "$OUT/cifar" --dataset cifar10
part bench-neuron $PY bench/neuron.py
part bench-pipelines $PY bench/pipelines.py
part bench-train-step $PY bench/train_step.py --devices cuda cpu --json "$OUT/train_step.json"
echo "gpu_check: $failed part(s) failed; logs in $OUT"
exit $failed
