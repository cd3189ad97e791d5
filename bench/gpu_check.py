"""The stages on a GPU: the tiny demo, then short PPO (full and LoRA), DPO and GRPO runs on the embedded model,
each timed, with its peak GPU memory (torch.cuda.max_memory_allocated / max_memory_reserved since the run began).

    bash bench/gpu_check.sh                            # on a machine with a CUDA GPU
    python bench/gpu_check.py --device cpu --model tiny  # the same script on the CPU, as a dry run

Every run goes through `rlhfkit.cli.main`, as a user's command would, in this one process, one after another.
A run that fails is reported in its row (exit status) and the others still run; the script exits 1 if any did.
The table is printed, and written with every row's details to OUT/gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def peak_memory(device: str) -> tuple[float | None, float | None]:
    """(allocated, reserved) peak in MiB on a CUDA device since the last reset; on the CPU, (max RSS, None)."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20, torch.cuda.max_memory_reserved() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, None


def run(name: str, argv: list[str], device: str, steps_of) -> dict:
    import torch

    from rlhfkit.cli import main

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        code = main(argv)
    except Exception:  # a crash is a result of this check: report it and go on
        traceback.print_exc()
        code = "crash"
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - started
    allocated, reserved = peak_memory(device)
    row = {"check": name, "exit": code, "wall_s": wall, "peak_allocated_mib": allocated,
           "peak_reserved_mib": reserved, "argv": argv}
    if code == 0:
        row.update(steps_of())
    return row


def metrics_summary(folder: Path, samples_per_step: int) -> dict:
    """Steps, mean step time (after the first, which warms kernels up), samples/s and the precision it ran in."""
    import yaml

    from rlhfkit.runtime.metrics_log import read_metrics

    rows = read_metrics(folder / "metrics.jsonl")
    timed = rows[1:] or rows
    step_s = sum(r["time/step_s"] for r in timed) / len(timed)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    return {"steps": len(rows), "step_s": step_s, "samples_per_s": samples_per_step / step_s,
            "precision": config["mixed_precision"], "ran_on": config["device"],
            "skipped_steps": rows[-1].get("train/skipped_steps", 0)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu for a dry run")
    parser.add_argument("--model", default="embedded", help="the model of the PPO, DPO and GRPO runs")
    parser.add_argument("--iterations", type=int, default=4, help="PPO and GRPO iterations (the first warms up)")
    parser.add_argument("--output-dir", default=None, help="where the runs go (default: a temporary folder)")
    args = parser.parse_args()

    import torch

    from ppo import make_reward_folder, prompts_file

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA GPU here; nothing was run (use --device cpu for a dry run)")
        return 2
    work = Path(args.output_dir or tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    what = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "CPU"
    print(f"gpu_check: {what}, torch {torch.__version__}, output in {work}")
    common = ["--device", args.device, "--progress", "false", "--save-every", "0"]
    rows = [run("demo --preset tiny (sft, annotate, reward, ppo, dpo, grpo, eval)",
                ["demo", "--preset", "tiny", "--algos", "ppo,dpo,grpo", "--device", args.device,
                 "--output-dir", str(work / "demo-tiny")], args.device, lambda: {})]
    rm = work / "rm"
    make_reward_folder(args.model, rm)  # the model's trunk with a seeded random scalar head, as bench/ppo.py
    prompts = prompts_file(work, 256)
    preferences = work / "demo-tiny" / "annotate" / "preferences.jsonl"
    rollout, mini = 32, 8
    ppo = ["ppo", "--model", args.model, "--reward-model", str(rm), "--data", str(prompts),
           "--max-steps", str(args.iterations), "--rollout-batch-size", str(rollout), "--mini-batch-size", str(mini),
           "--max-new-tokens", "48", "--max-prompt-length", "64", "--max-length", "112", "--critic-init", "reward",
           "--sample-every", "0", *common]
    for name, argv, per_step in (
            (f"ppo ({args.model}, full)", [*ppo, "--output-dir", str(work / "ppo")], rollout),
            (f"ppo ({args.model}, LoRA r=16)", [*ppo, "--lora-r", "16", "--lora-alpha", "32", "--learning-rate", "1e-4",
                                           "--output-dir", str(work / "ppo-lora")], rollout),
            (f"dpo ({args.model})", ["dpo", "--model", args.model, "--data", str(preferences), "--max-steps", "10",
                                "--batch-size", "8", "--eval-every", "0", "--max-prompt-length", "64",
                                "--max-length", "112", *common, "--output-dir", str(work / "dpo")], 8),
            (f"grpo ({args.model})", ["grpo", "--model", args.model, "--reward-model", str(rm), "--data", str(prompts),
                                 "--max-steps", str(args.iterations), "--prompts-per-step", "8",
                                 "--num-generations", "4", "--max-new-tokens", "48", "--max-prompt-length", "64",
                                 "--max-length", "112", "--sample-every", "0", *common,
                                 "--output-dir", str(work / "grpo")], 32)):
        folder = Path(argv[argv.index("--output-dir") + 1])
        rows.append(run(name, argv, args.device, lambda f=folder, n=per_step: metrics_summary(f, n)))

    memory = "peak alloc MiB" if args.device.startswith("cuda") else "max RSS MiB"
    print(f"\n| check | exit | ran on | precision | wall s | s/step | samples/s | {memory} | peak reserved MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        def num(key, fmt):
            return format(r[key], fmt) if r.get(key) is not None else "-"
        print(f"| {r['check']} | {r['exit']} | {r.get('ran_on', args.device)} | {r.get('precision', '-')} | "
              f"{num('wall_s', '.1f')} | {num('step_s', '.2f')} | {num('samples_per_s', '.1f')} | "
              f"{num('peak_allocated_mib', '.0f')} | {num('peak_reserved_mib', '.0f')} |")
    (work / "gpu_check.json").write_text(json.dumps(rows, indent=1))
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
