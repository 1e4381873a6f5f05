#!/usr/bin/env bash
# The GPU checks in one call (at most about 8 minutes): the CUDA tests (tests/test_gpu.py) and
# the GPU benchmarks, on a bare GPU machine that has torch and torchvision but may lack
# hydra-core / omegaconf (wheels carried in .whl/). Logs and the benchmarks' JSON go to $OUT
# (or outputs/gpu_check).
#
#   bash launch/gpu_check.sh --fetch-wheels   # here, once: pure-Python wheels into .whl/
#   bash launch/gpu_check.sh                  # there (e.g. the device tool, carry [".whl"])
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--fetch-wheels" ]; then  # (antlr4 4.9.3, omegaconf's pin, is an sdist only)
  python3 -m pip wheel -q --no-deps -w .whl hydra-core==1.3.8 omegaconf==2.3.1 \
    antlr4-python3-runtime==4.9.3 || exit 1
  ls -l .whl
  exit 0
fi

out=${OUT:-outputs/gpu_check}
mkdir -p "$out"
if ! python3 -c "import hydra, omegaconf" 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "gpu_check: hydra-core/omegaconf missing and no" \
    "wheels in .whl/; run: bash launch/gpu_check.sh --fetch-wheels (where pip works)" >&2; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/caco-site .whl/*.whl || exit 2
  export PYTHONPATH=/tmp/caco-site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 - <<'PY' || exit 2
import torch
assert torch.cuda.is_available(), "gpu_check: torch sees no CUDA device"
print("gpu_check:", torch.cuda.get_device_name(0), "torch", torch.__version__)
PY

rc=0
timeout 180 python3 -m pytest -p no:cacheprovider -q -m gpu tests/test_gpu.py 2>&1 \
  | tee "$out/gpu_tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
for bench in "bench=gpu" "bench=augment bench.device=cuda bench.image_size=224 bench.batch_size=256 bench.compile=true" \
             "bench=knn bench.device=cuda" \
             "bench=knn bench.device=cuda bench.feature_dtype=fp16" \
             "bench=step bench.device=cuda bench.arch=resnet50 bench.small_stem=false bench.image_size=224 bench.batch_size=128 bench.bank_size=65536 bench.dim=256"; do
  name=$(echo "$bench" | tr ' =.' '_--' | cut -c1-60)
  # shellcheck disable=SC2086
  timeout 240 python3 launch/benchmark.py $bench output_root=/tmp/caco-bench 2>&1 \
    | tee "$out/$name.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1  # (its last line is the JSON result)
done
exit "$rc"
