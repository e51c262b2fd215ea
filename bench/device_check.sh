#!/usr/bin/env bash
# One accelerator session: backend determinism, then throughput.
#
#   OUT=/tmp/dc bash bench/device_check.sh
#
# 1. Digests of every config in configs/ on the default backend (GPU/TPU) and
#    on the CPU backend of the same machine (scripts/backend_digests.py), on the
#    tiny models and on the ~1.3 GB pair; compared tensor by tensor.
# 2. Throughput on the ~1.3 GB pair: the I/O floor (bench/io_floor.py) and
#    merges through bench/merge_probe.py (phase times, device peak memory),
#    round-robin, REPEAT times.
# Results go to $OUT (JSON per step, log.txt). Needs the runtime dependencies
# importable (PYTHONPATH is set to the repository root; nothing is installed).
set -uo pipefail
OUT=${OUT:-/tmp/device-check}
REPEAT=${REPEAT:-3}
PY=${PY:-python3}
W=${WORK:-/tmp/ssj-device}
mkdir -p "$OUT" "$W"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/log.txt") 2>&1

echo "== machine"; date -u; nproc; free -g | head -2; nvidia-smi -L 2>/dev/null
$PY -c "import jax, numpy, safetensors, ml_dtypes, typer, yaml; print('jax', jax.__version__, jax.devices())" || exit 1

echo "== models"
t=$(date +%s)
$PY -m cli.main tiny "$W/tiny" >/dev/null || exit 1
$PY -m cli.main tiny "$W/big" --preset 1.3gb >/dev/null || exit 1
echo "made models in $(( $(date +%s) - t )) s"

echo "== digests: default backend vs cpu (tiny models, every config)"
CFGS=(configs/superswallow-tiny.yaml configs/examples/*.yaml)
$PY scripts/backend_digests.py run --models "$W/tiny" --out "$OUT/tiny-accel.json" "${CFGS[@]}"
JAX_PLATFORMS=cpu $PY scripts/backend_digests.py run --models "$W/tiny" --out "$OUT/tiny-cpu.json" "${CFGS[@]}"
$PY scripts/backend_digests.py compare "$OUT/tiny-cpu.json" "$OUT/tiny-accel.json"

echo "== digests: default backend vs cpu (1.3 GB pair)"
cat >"$W/ties-big.yaml" <<'YAML'
# TIES on the two-model 1.3 GB pair (the example config needs three models)
models:
  - model: models/swallow
  - model: models/tulu
    parameters: {weight: 0.7, density: 0.3}
merge_method: ties
base_model: models/swallow
dtype: bfloat16
tokenizer_source: union
YAML
BIG=(configs/superswallow-tiny.yaml configs/examples/dare-ties-d05.yaml "$W/ties-big.yaml")
$PY scripts/backend_digests.py run --models "$W/big" --out "$OUT/big-accel.json" "${BIG[@]}"
JAX_PLATFORMS=cpu $PY scripts/backend_digests.py run --models "$W/big" --out "$OUT/big-cpu.json" "${BIG[@]}"
$PY scripts/backend_digests.py compare "$OUT/big-cpu.json" "$OUT/big-accel.json"

echo "== throughput (1.3 GB pair, files in the page cache)"
sed "s#models/#$W/big/#g" configs/superswallow-tiny.yaml >"$W/ss.yaml"
sed "s#models/#$W/big/#g" configs/examples/dare-ties-d05.yaml >"$W/dare.yaml"
cat "$W"/big/*/*.safetensors >/dev/null
for i in $(seq "$REPEAT"); do
  rm -rf "$W/o"; sync
  echo "floor $($PY bench/io_floor.py "$W/big/swallow" "$W/big/tulu" "$W/floor.bin")"
  for r in ss dare; do
    rm -rf "$W/o"; sync
    echo "$r accel $($PY bench/merge_probe.py "$W/$r.yaml" "$W/o")"
    rm -rf "$W/o"; sync
    echo "$r accel-nofsync $($PY bench/merge_probe.py "$W/$r.yaml" "$W/o" --no-fsync)"
    rm -rf "$W/o"; sync
    echo "$r accel-nofsync-chunk16M $($PY bench/merge_probe.py "$W/$r.yaml" "$W/o" --no-fsync --chunk-elems 16777216)"
    rm -rf "$W/o"; sync
    echo "$r cpu $(JAX_PLATFORMS=cpu $PY bench/merge_probe.py "$W/$r.yaml" "$W/o")"
  done
done
echo "== done"; date -u
