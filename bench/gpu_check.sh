#!/usr/bin/env bash
# The GPU check of issue 14: the tiny demo, then short PPO (full and LoRA), DPO and GRPO runs on the embedded
# model on a CUDA GPU, with timings and peak GPU memory (see bench/gpu_check.py). Run it from the repository root
# in an environment where rlhfkit is installed with a CUDA build of torch:
#   bash bench/gpu_check.sh [--device cuda:1] [--output-dir DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: torch sees no CUDA GPU on this machine; nothing to check (python bench/gpu_check.py --device cpu --model tiny runs the same script on the CPU)"
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec python bench/gpu_check.py "$@"
