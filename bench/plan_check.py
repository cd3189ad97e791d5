"""`rlhfkit plan`'s predicted peaks against measured ones: every training stage, full and LoRA, tiny and embedded.

Each case runs the real stage (`rlhfkit <stage> ...`, fp32, OMP_NUM_THREADS=1) in a fresh process through a small
driver that:
  - takes the baseline right before the first model is loaded (tokenizer and data already in memory): it
    collects garbage, hands glibc's free heap back (malloc_trim), resets the peak RSS (/proc/self/clear_refs 5)
    and reads VmRSS;
  - reads the peak (VmHWM) when the stage first writes a file with safetensors or torch.save, i.e. after training
    and before saving (serialising weights makes host-side copies that a GPU run would not have);
  - lets no response end early (no EOS), so every sequence has the length the planner sizes for; the data files
    are long texts, so every training sequence is max_length tokens too.
measured = peak RSS - baseline; predicted = the plan's peak on a CPU (`rlhfkit plan ... --devices cpu:...`).
The RSS is made to follow the live tensors (see `env`: glibc maps every block from 64 KiB up on its own);
`--keep-freed-memory` measures with rlhfkit's own setting (host_memory.py) instead, whose RSS also keeps freed
blocks for reuse: the difference is what that speed-up costs in memory.

Usage: python bench/plan_check.py [--models tiny,embedded] [--stages sft,reward,dpo,grpo,ppo] [--lora both|no|yes]
(one case at a time; the embedded cases take about a minute each on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

DRIVER = r"""
import ctypes, gc, json, sys

out_path, argv = sys.argv[1], sys.argv[2:]
state = {"baseline": None, "peak": None, "loads": []}


def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024


def baseline():
    if state["baseline"] is None:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        state["baseline"] = status("VmRSS")


def peak():
    if state["peak"] is None:
        state["peak"] = status("VmHWM")


import safetensors.torch as st  # patched before transformers and peft bind save_file

_save_file = st.save_file
st.save_file = lambda *a, **k: (peak(), _save_file(*a, **k))[1]
import torch

_torch_save = torch.save
torch.save = lambda *a, **k: (peak(), _torch_save(*a, **k))[1]

import rlhfkit.models.loading as loading
import rlhfkit.models.reward_model as reward_model
import rlhfkit.rollout.generate as generate


def watched(fn):
    def load(*a, **k):
        baseline()
        model = fn(*a, **k)
        state["loads"].append(status("VmRSS") - state["baseline"])
        return model
    return load


loading.load_causal_lm = watched(loading.load_causal_lm)
reward_model.load_reward_model = watched(reward_model.load_reward_model)
generate.eos_token_ids = lambda model, tokenizer: {-1}  # every response runs to max_new_tokens

import os

if os.environ.get("PLAN_CHECK_PHASES") == "1":  # RSS every 2 ms, by phase of the stage (for diagnosis)
    import threading
    import time

    import rlhfkit.trainers.rl_loop as rl_loop

    phase, state["phases"] = ["load"], {}

    def sample():
        while True:
            if state["baseline"] is not None:
                rss = status("VmRSS") - state["baseline"]
                state["phases"][phase[0]] = max(state["phases"].get(phase[0], 0), rss)
            time.sleep(0.002)

    def mark(module, name, label):
        fn = getattr(module, name)

        def marked(*a, **k):
            phase[0] = label
            try:
                return fn(*a, **k)
            finally:
                phase[0] = f"after {label}"
        setattr(module, name, marked)

    mark(generate, "sample_responses", "generate")
    mark(rl_loop, "update", "train")
    threading.Thread(target=sample, daemon=True).start()

from rlhfkit.cli import main

code = main(argv)
peak()
with open(out_path, "w") as f:
    json.dump({"code": code, **state}, f)
"""

LONG = " ".join(f"word{i % 97} is here and there" for i in range(400))

# Sized so that the model's own tensors dominate the process's overhead (see tests/plan/). GRPO and PPO peak in
# the update, whose activations follow the whole sequence (512 tokens), so their responses are short: 32 new
# tokens after 480 of prompt set the same peak as 128 after 384 (measured: PPO 839 MiB both ways), in half the time.
TINY = {
    "sft": {"batch_size": 16, "max_length": 128, "max_prompt_length": 64},
    "reward": {"batch_size": 16, "max_length": 512, "max_prompt_length": 256},
    "dpo": {"batch_size": 16, "max_length": 512, "max_prompt_length": 256},
    "grpo": {"prompts_per_step": 8, "num_generations": 4, "mini_batch_size": 32, "gradient_accumulation_steps": 1,
             "max_prompt_length": 480, "max_new_tokens": 32, "max_length": 512, "beta": 0.04},
    "ppo": {"rollout_batch_size": 32, "mini_batch_size": 32, "gradient_accumulation_steps": 1, "ppo_epochs": 1,
            "max_prompt_length": 480, "max_new_tokens": 32, "max_length": 512},
}
EMBEDDED = {
    "sft": {"batch_size": 8, "max_length": 128, "max_prompt_length": 64},
    "reward": {"batch_size": 4, "max_length": 128, "max_prompt_length": 64},
    "dpo": {"batch_size": 4, "max_length": 128, "max_prompt_length": 64},
    "grpo": {"prompts_per_step": 4, "num_generations": 4, "mini_batch_size": 16, "gradient_accumulation_steps": 2,
             "max_prompt_length": 64, "max_new_tokens": 32, "max_length": 128, "beta": 0.04},
    "ppo": {"rollout_batch_size": 16, "mini_batch_size": 8, "gradient_accumulation_steps": 1, "ppo_epochs": 1,
            "max_prompt_length": 64, "max_new_tokens": 32, "max_length": 128},
}
# Two steps: the second one runs with the optimizer state the first created (the peak of every later step).
STEPS = {"sft": 2, "reward": 2, "dpo": 2, "grpo": 2, "ppo": 2}
DATA_KIND = {"sft": "sft", "reward": "preference", "dpo": "preference", "grpo": "prompt", "ppo": "prompt"}


def write_data(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    rows = {"sft": {"prompt": LONG, "completion": LONG},
            "preference": {"prompt": LONG, "chosen": LONG, "rejected": LONG[::-1]},
            "prompt": {"prompt": LONG}}
    paths = {}
    for kind, row in rows.items():
        path = folder / f"{kind}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for _ in range(64)))
        paths[kind] = str(path)
    return paths


def stage_flags(stage: str, model: str, data: str, out: str, sizes: dict, lora: bool, reward_model: str | None):
    flags = {"model": model, "data": data, "output_dir": out, "mixed_precision": "no", "progress": "false",
             "save_every": 0, "max_steps": STEPS[stage], **sizes[stage]}
    if stage in ("sft", "reward", "dpo"):
        flags["eval_fraction"] = 0
    else:
        flags.update({"sample_every": 0, "reward_model": reward_model})
    if lora:
        flags["lora_r"] = 16
    return flags


def as_argv(stage: str, flags: dict) -> list[str]:
    argv = [stage]
    for key, value in flags.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


# Allocations from this size up get their own mapping from glibc, given back to the kernel when freed.
MMAP_THRESHOLD = 2**16


def env(keep_freed_memory: bool = False) -> dict:
    """One thread, offline, and RSS that follows the live tensors: the planner counts tensors (what a GPU's
    torch.cuda.max_memory_allocated reports), not what the C allocator keeps. rlhfkit's command keeps freed heap
    memory for reuse on the CPU (host_memory.py), and even glibc's defaults serve blocks below a threshold that
    rises to 32 MiB from the heap, where freed blocks stay in the RSS (LoRA's many small adapter tensors
    fragment it: the embedded model's LoRA SFT kept 500 MiB more RSS after each step with a 1 MiB threshold than
    with 64 KiB); so unless `keep_freed_memory`, the stage runs with rlhfkit's setting off and glibc's mmap
    threshold fixed at 64 KiB (MALLOC_MMAP_THRESHOLD_): every tensor above it is its own mapping, returned when
    it is freed."""
    out = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "RLHFKIT_KEEP_FREED_MEMORY": "1" if keep_freed_memory else "0"}
    if not keep_freed_memory:
        out["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    return out


def measure(stage: str, flags: dict, keep_freed_memory: bool = False, phases: bool = False) -> dict:
    """Run the stage in a fresh process under the driver: {'baseline', 'peak', 'measured', 'loads'} in bytes
    (and with `phases`, the largest RSS above the baseline in each phase: load, generate, after generate, train)."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        done = subprocess.run([sys.executable, "-c", DRIVER, str(result), *as_argv(stage, flags)],
                              env={**env(keep_freed_memory), "PLAN_CHECK_PHASES": "1" if phases else "0"},
                              capture_output=True, text=True)
        if done.returncode != 0 or not result.exists():
            raise RuntimeError(f"{stage} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        data = json.loads(result.read_text())
    data["measured"] = data["peak"] - data["baseline"]
    return data


def predict(stage: str, flags: dict) -> dict:
    """The plan's peak for the same settings on a CPU large enough to hold it, and its breakdown."""
    from rlhfkit.config_parsing import build_config
    from rlhfkit.plan import build_workload, parse_devices, plan

    overrides = {k: str(v) for k, v in flags.items() if v is not None}
    config = build_config(stage, overrides=overrides)
    p = plan(build_workload(stage, config), parse_devices("cpu:4096GB"))
    peak = p.peak(0)
    return {"predicted": peak.total, "phase": peak.phase, "parts": peak.parts}


def ensure_reward_model(folder: Path, model: str, data: dict) -> str:
    """A reward model for PPO and GRPO: one step of `rlhfkit reward` on `model`."""
    out = folder / f"rm-{model}"
    if not (out / "config.json").exists():
        flags = {"model": model, "data": data["preference"], "output_dir": str(out), "max_steps": 1,
                 "batch_size": 2, "max_length": 64, "max_prompt_length": 32, "eval_fraction": 0,
                 "progress": "false", "mixed_precision": "no"}
        subprocess.run([sys.executable, "-m", "rlhfkit", *as_argv("reward", flags)], env=env(), check=True,
                       capture_output=True)
    return str(out)


def check(stage: str, model: str, lora: bool, work: Path, sizes: dict | None = None,
          keep_freed_memory: bool = False, phases: bool = False, shared: Path | None = None) -> dict:
    """Predict and measure one case; the stage writes under `work`, and the data and the reward model are made
    once under `shared` (default: `work`) for every case that passes the same folder."""
    sizes = sizes or (TINY if model == "tiny" else EMBEDDED)
    shared = shared or work
    data = write_data(shared / "data")
    rm = ensure_reward_model(shared, model, data) if stage in ("grpo", "ppo") else None
    flags = stage_flags(stage, model, data[DATA_KIND[stage]], str(work / f"out-{stage}-{model}-{int(lora)}"), sizes,
                        lora, rm)
    row = {"stage": stage, "model": model, "lora": lora, **predict(stage, flags),
           **measure(stage, flags, keep_freed_memory, phases)}
    row["error"] = row["predicted"] / row["measured"] - 1
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,embedded")
    parser.add_argument("--stages", default="sft,reward,dpo,grpo,ppo")
    parser.add_argument("--lora", default="both", choices=("both", "no", "yes"))
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="measure with rlhfkit's glibc setting on (freed heap kept: RSS above the live tensors)")
    parser.add_argument("--phases", action="store_true", help="also print the measured RSS of each phase")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    loras = {"both": (False, True), "no": (False,), "yes": (True,)}[args.lora]
    rows = []
    mib = 2**20
    print(f"{'model':<9} {'stage':<7} {'lora':<5} {'predicted MiB':>14} {'measured MiB':>13} {'error':>7}  "
          f"peak phase, largest parts (MiB)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            for stage in args.stages.split(","):
                for lora in loras:
                    row = check(stage, model, lora, Path(tmp), keep_freed_memory=args.keep_freed_memory,
                                phases=args.phases)
                    rows.append(row)
                    parts = sorted(((v, k) for k, v in row["parts"].items() if v), reverse=True)[:4]
                    print(f"{model:<9} {stage:<7} {'yes' if lora else 'no':<5} {row['predicted'] / mib:>14.0f} "
                          f"{row['measured'] / mib:>13.0f} {row['error']:>+7.1%}  {row['phase']}: "
                          + ", ".join(f"{k} {v / mib:.0f}" for v, k in parts), flush=True)
                    if args.phases:
                        print("    measured by phase (MiB): " + ", ".join(
                            f"{k} {v / mib:.0f}" for k, v in row.get("phases", {}).items()), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
