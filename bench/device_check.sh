#!/usr/bin/env bash
# One accelerator session: backend determinism, then throughput.
#
#   OUT=/tmp/dc bash bench/device_check.sh
#
# 1. Digests of the configs on the default backend (GPU/TPU) on the tiny
#    models and on the ~1.3 GB pair (scripts/backend_digests.py); with
#    CPU_TOO=1 also on the CPU backend of the same machine, compared tensor by
#    tensor. Compare with another machine's run (e.g. a CPU laptop) with
#    `scripts/backend_digests.py compare A.json B.json`.
# 2. Throughput on the ~1.3 GB pair: host<->device copy bandwidth
#    (bench/h2d.py), the I/O floor (bench/io_floor.py) and merges through
#    bench/merge_probe.py (phase times, CPU seconds per thread, device peak
#    memory), round-robin, REPEAT times.
# Knobs (environment): TINY_CONFIGS, BIG_CONFIGS (space-separated paths),
# REPEAT (default 2), CPU_TOO (default 0), STEPS (default "digests throughput").
# Results go to $OUT (JSON per step, log.txt). Needs the runtime dependencies
# importable (PYTHONPATH is set to the repository root; nothing is installed).
set -uo pipefail
OUT=${OUT:-/tmp/device-check}
REPEAT=${REPEAT:-2}
CPU_TOO=${CPU_TOO:-0}
STEPS=${STEPS:-"digests throughput"}
PY=${PY:-python3}
W=${WORK:-/tmp/ssj-device}
read -r -a TINY <<<"${TINY_CONFIGS:-configs/superswallow-tiny.yaml $(echo configs/examples/*.yaml)}"
read -r -a BIG <<<"${BIG_CONFIGS:-configs/superswallow-tiny.yaml configs/examples/dare-ties-d05.yaml}"
mkdir -p "$OUT" "$W"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/log.txt") 2>&1

echo "== machine"; date -u; nproc; free -g | head -2; nvidia-smi -L 2>/dev/null
$PY -c "import jax, numpy, safetensors, ml_dtypes, typer, yaml; print('jax', jax.__version__, jax.devices())" || exit 1

echo "== models"
t=$(date +%s)
$PY -m superswallow_jax.cli tiny "$W/tiny" >/dev/null || exit 1
$PY -m superswallow_jax.cli tiny "$W/big" --preset 1.3gb >/dev/null || exit 1
echo "made models in $(( $(date +%s) - t )) s"

digests() {  # digests LABEL MODELS CONFIGS...
  local label=$1 models=$2; shift 2
  $PY scripts/backend_digests.py run --models "$models" --out "$OUT/$label-accel.json" "$@"
  if [ "$CPU_TOO" = 1 ]; then
    JAX_PLATFORMS=cpu $PY scripts/backend_digests.py run --models "$models" --out "$OUT/$label-cpu.json" "$@"
    $PY scripts/backend_digests.py compare "$OUT/$label-cpu.json" "$OUT/$label-accel.json"
  fi
}

throughput() {
  sed "s#models/#$W/big/#g" configs/superswallow-tiny.yaml >"$W/ss.yaml"
  sed "s#models/#$W/big/#g" configs/examples/dare-ties-d05.yaml >"$W/dare.yaml"
  cat "$W"/big/*/*.safetensors >/dev/null
  echo "== host<->device copies (bench/h2d.py; the loop moves 2.7 GB in and 1.35 GB out)"
  $PY bench/h2d.py
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
      rm -rf "$W/o"; sync  # what the pass cache buys on the device (DARE keeps inputs and masks between passes)
      echo "$r accel-nofsync-nopasscache $($PY bench/merge_probe.py "$W/$r.yaml" "$W/o" --no-fsync --pass-cache-mb 0)"
    done
  done
}

for step in $STEPS; do
  case $step in
    digests)
      echo "== digests (tiny models)"; digests tiny "$W/tiny" "${TINY[@]}"
      echo "== digests (1.3 GB pair)"; digests big "$W/big" "${BIG[@]}" ;;
    throughput)
      echo "== throughput (1.3 GB pair, files in the page cache)"; throughput ;;
  esac
done
echo "== done"; date -u
