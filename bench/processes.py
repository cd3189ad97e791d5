"""Samples per second of PPO and DPO with one process against two (torchrun, gloo), on the tiny and embedded models.

On a CPU, N processes share its cores: one process with T threads against N processes of T / N threads each.
Each case runs the real stage (`rlhfkit <stage>`, fp32) in fresh processes with the same global batch, and reads
`perf/samples_per_s` from its metrics.jsonl (the global batch over the step's wall time, both computed by the
main process), averaged over the steps after the first (which pays for warm-up). Both also run with
`distributed: fsdp`, and PPO with `fsdp_frozen: shard` as well (the reference and reward model sharded too).
"peak RSS" is the largest process's peak resident memory (getrusage of the launched processes, each case in its
own shim process): what one process needs, the number that decides whether N processes fit beside each other.

Usage: python bench/processes.py [--models tiny,embedded] [--stages ppo,dpo] [--threads 2]
(the embedded cases take a few minutes each on 2 cores; run nothing else meanwhile).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from plan_check import as_argv, ensure_reward_model, write_data  # noqa: E402  (bench/ is not a package)

SIZES = {
    ("tiny", "ppo"): {"rollout_batch_size": 32, "mini_batch_size": 16, "ppo_epochs": 1, "max_prompt_length": 64,
                      "max_new_tokens": 32, "max_length": 128, "max_steps": 4},
    ("tiny", "dpo"): {"batch_size": 16, "max_length": 256, "max_prompt_length": 128, "max_steps": 5},
    ("embedded", "ppo"): {"rollout_batch_size": 16, "mini_batch_size": 8, "ppo_epochs": 1, "max_prompt_length": 64,
                          "max_new_tokens": 32, "max_length": 128, "max_steps": 3},
    ("embedded", "dpo"): {"batch_size": 8, "max_length": 128, "max_prompt_length": 64, "max_steps": 4},
}


def run_case(stage: str, model: str, flags: dict, procs: int, threads: int, extra: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        argv = as_argv(stage, {**flags, **extra, "output_dir": str(out)})
        launcher = [sys.executable] if procs == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
        # getrusage(RUSAGE_CHILDREN) is a maximum over every child ever waited for: a fresh shim per case
        shim = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
                "print(f'peak_rss_kib {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}', file=sys.stderr); "
                "sys.exit(code)")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", shim, *launcher, "-m", "rlhfkit", *argv], env=env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"{stage} {model} x{procs} failed:\n{done.stderr[-3000:]}")
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["perf/samples_per_s"] for r in rows[1:]] or [rows[0]["perf/samples_per_s"]]
    peak = int(done.stderr.rsplit("peak_rss_kib ", 1)[1].split()[0]) * 1024
    return {"samples_per_s": sum(rates) / len(rates), "wall_s": wall, "peak_rss": peak}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,embedded")
    parser.add_argument("--stages", default="ppo,dpo")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="threads in all, shared by the processes")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-processes-"))
    data = write_data(work / "data")
    layouts = [(1, args.threads, {}), (2, max(1, args.threads // 2), {})]
    print("| model | stage | layout | samples/s | vs 1 process | peak RSS of a process (GB) | wall s |")
    print("|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        for stage in args.stages.split(","):
            flags = {"model": model, "mixed_precision": "no", "progress": "false", "save_every": 0,
                     **SIZES[model, stage]}
            if stage == "ppo":
                flags.update({"data": data["prompt"], "sample_every": 0,
                              "reward_model": ensure_reward_model(work, model, data)})
            else:
                flags.update({"data": data["preference"], "eval_fraction": 0})
            cases = layouts + [(2, max(1, args.threads // 2), {"distributed": "fsdp"})]
            if stage == "ppo":
                cases.append((2, max(1, args.threads // 2), {"distributed": "fsdp", "fsdp_frozen": "shard"}))
            base = None
            for procs, threads, extra in cases:
                result = run_case(stage, model, flags, procs, threads, extra)
                base = base or result["samples_per_s"]
                settings = [value if key == "distributed" else f"{key}: {value}" for key, value in extra.items()]
                layout = f"{procs} x {threads} thread{'s' if threads > 1 else ''}" + \
                    "".join(f", {setting}" for setting in settings)
                print(f"| {model} | {stage} | {layout} | {result['samples_per_s']:.2f} | "
                      f"{result['samples_per_s'] / base:.2f}x | {result['peak_rss'] / 1e9:.2f} | "
                      f"{result['wall_s']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
