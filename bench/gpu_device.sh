#!/usr/bin/env bash
# The GPU part of `make bench` on a lent GPU machine that reaches no package registry, as one script.
#
# Here (with the registry):   make gpu-wheels      # fills .gpu-wheels/ for the machine's Python (3.12)
# There (the device's run):   bash bench/gpu_device.sh            with carry [".gpu-wheels"]
#
# It uses the machine's own torch and transformers (a virtualenv with its site packages), installs
# from the carried wheels only what that Python cannot import, runs `bench.run --part gpu` (the
# 1.1B Llama matrix: LoRA, full and QLoRA in bf16, against the plain HF + peft script, and TRL +
# Liger) and leaves its table, raw rows and the device's description under $OUT (or runs/gpu-out).
# GPU_BENCH_STEPS (default 60) and GPU_BENCH_ROUNDS (default 1) keep it within about 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
python3 -m venv --system-site-packages /tmp/ftw-gpu-venv \
  || python3 -m venv --system-site-packages --without-pip /tmp/ftw-gpu-venv  # no ensurepip there
py=/tmp/ftw-gpu-venv/bin/python
[ -x "$py" ] || py=python3  # no venv at all: the machine's Python, its user site for the wheels
"$py" -m pip --version >/dev/null 2>&1 || { echo "no pip for $py: installing nothing" | tee -a "$out/device.txt"; }
# What this Python cannot import, by distribution name (bench/gpu_wheels.py holds the one list).
missing=$("$py" bench/gpu_wheels.py --missing)
echo "missing on this machine: ${missing:-nothing}" | tee -a "$out/device.txt"
for dist in $missing; do
  # One at a time and without dependencies: a wheel that was not carried (too big for this
  # run) is reported and skipped; the rows that need it say so.
  "$py" -m pip install -q --no-index --no-deps --find-links .gpu-wheels "$dist" $([ "$py" = python3 ] && echo --user) \
    || echo "not installed: $dist (not among the carried wheels)" | tee -a "$out/device.txt"
done
"$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$out/device.txt"
export PYTHONPATH="$PWD/python:$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$py" -m bench.run --part gpu --rounds "${GPU_BENCH_ROUNDS:-1}" --steps "${GPU_BENCH_STEPS:-60}" \
  --work-dir /tmp/ftw-gpu-work --record "$out/BENCHMARKS.md" --json "$out/gpu.json"
