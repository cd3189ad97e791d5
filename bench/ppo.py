"""PPO throughput and memory: rlhfkit against TRL's last PPO trainer, same models and settings, one run.

    pip install trl==1.12.0 requests     # TRL's side (trl.experimental.ppo); skipped if missing
    python bench/ppo.py                  # tiny and embedded models
    python bench/ppo.py --models tiny --iterations 3

Each (system, model) pair runs in its own Python process, so peak memory (max RSS, which includes loading the
four models) is measured separately. Every system gets: the same policy (also the reference), the same reward
model (the policy's trunk with a seeded random scalar head, also the critic's start), the same prompts
(chatterbot, chat template), rollout batch, mini-batch, micro-batch, PPO epochs, response length, temperature
1, the same precision (`--precision`: `auto` is bf16 autocast where the CPU runs bf16 natively, fp32 where it
would only emulate it; `fp32` or `bf16` force one on both sides), scoring forwards over the whole rollout, and
no evaluation or checkpoints. The first iteration warms up and is not timed.

- `rlhfkit`: the defaults; the policy's old log-probs come from a scoring forward, so the first update's
  ratio is exactly 1.
- `rlhfkit-sampled`: `logprobs_from_sampling`, which takes them from the sampling pass, as TRL's PPO does.
- `trl`: TRL as its users get it (sdpa attention, transformers' pick).
- `trl-eager`: TRL with the eager attention rlhfkit picks on the CPU, to show how much of the difference
  that one setting makes.
- `rlhfkit-lora`: rlhfkit with LoRA (`--lora-r`, every linear layer of the trunk): one frozen base serves as
  policy (adapter), reference (adapter off) and critic (second adapter + value head); the reward model is its
  own model. Compared with `rlhfkit` (full fine-tuning of policy and critic) in samples/s and peak memory.
- `rlhfkit-lora-gc`: the same with gradient checkpointing: a micro-batch's activations are recomputed in the
  backward instead of kept. With LoRA the backward computes no gradient for the base's weights, so the recompute
  costs about what full fine-tuning's weight gradients cost.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from precision_choice import MIXED, PRECISION_WORDS, resolve_bench_precision  # noqa: E402


def make_reward_folder(model_name: str, folder: Path) -> None:
    import torch

    from rlhfkit.models.loading import load_tokenizer, resolve_model_path
    from rlhfkit.models.reward_model import load_reward_model

    tokenizer = load_tokenizer(model_name)
    rm = load_reward_model(resolve_model_path(model_name), tokenizer.pad_token_id)
    with torch.no_grad():
        torch.manual_seed(0)
        rm.score.weight.normal_(0, rm.config.hidden_size ** -0.5)
    rm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def prompts_file(folder: Path, n: int) -> Path:
    from rlhfkit.data.stage_records import embedded_prompts

    path = folder / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in embedded_prompts("train")[:n]))
    return path


def run_ours(args, rm_folder: Path, prompts: Path, work: Path) -> dict:
    from rlhfkit.config_parsing import build_config
    from rlhfkit.runtime.metrics_log import read_metrics
    from rlhfkit.trainers.ppo import run_ppo

    overrides = dict(model=args.model, reward_model=rm_folder, data=prompts, output_dir=work / args.system,
                     max_steps=args.iterations + 1, rollout_batch_size=args.rollout, mini_batch_size=args.mini,
                     gradient_accumulation_steps=args.mini // args.micro, ppo_epochs=args.epochs,
                     max_new_tokens=args.response_length, max_prompt_length=64, max_length=64 + args.response_length,
                     forward_batch_size=args.rollout, mixed_precision=MIXED[args.precision], save_every=0,
                     sample_every=0,
                     progress=False, critic_init="reward",
                     logprobs_from_sampling=args.system == "rlhfkit-sampled",
                     lora_r=args.lora_r if args.system.startswith("rlhfkit-lora") else 0, lora_alpha=2 * args.lora_r,
                     gradient_checkpointing=args.system.endswith("-gc"))
    config = build_config("ppo", overrides=[(k, str(v)) for k, v in overrides.items()])
    config.save_every = 10**9  # no checkpoint inside the timed window (the final one is written after it)
    run_ppo(config)
    rows = read_metrics(work / args.system / "metrics.jsonl")[1:]  # drop the warm-up iteration
    total = sum(r["time/step_s"] for r in rows)
    return {"seconds": total, "samples": args.rollout * len(rows), "marks": len(rows) + 1,
            "tokens": sum(r["response/length_mean"] * args.rollout for r in rows),
            "generate_s": sum(r["time/rollout_s"] for r in rows), "score_s": sum(r["time/score_s"] for r in rows),
            "train_s": sum(r["time/train_s"] for r in rows)}


def run_trl(args, rm_folder: Path, prompts: Path, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback

    import trl.experimental.ppo.ppo_trainer as trl_ppo
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from rlhfkit.data.tokenize import tokenize_prompt
    from rlhfkit.models.loading import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(args.model)
    records = [json.loads(line) for line in prompts.read_text().splitlines()]
    ids = [tokenize_prompt(tokenizer, r["prompt"], 64) for r in records]
    dataset = Dataset.from_dict({"input_ids": ids})
    folder = resolve_model_path(args.model)
    # "trl" is TRL as its users run it (transformers picks sdpa attention); "trl-eager" gives it the eager
    # attention that rlhfkit uses on the CPU, to show how much of the difference that choice alone makes.
    attention = {"attn_implementation": "eager"} if args.system == "trl-eager" else {}
    policy = AutoModelForCausalLM.from_pretrained(folder, **attention)
    ref = AutoModelForCausalLM.from_pretrained(folder, **attention)
    value = AutoModelForSequenceClassification.from_pretrained(rm_folder, num_labels=1, **attention)
    reward = AutoModelForSequenceClassification.from_pretrained(rm_folder, num_labels=1, **attention)
    iterations = args.iterations + 1
    config = PPOConfig(
        # TRL 1.12: rollout = per_device_train_batch_size x gradient_accumulation_steps; mini-batch = rollout /
        # num_mini_batches; micro-batch = per_device_train_batch_size. (Its accelerator then steps the
        # optimizer once per rollout/micro micro-batches; the forward/backward work is the same as ours.)
        output_dir=str(work / "trl"), per_device_train_batch_size=args.micro,
        gradient_accumulation_steps=args.rollout // args.micro, num_mini_batches=args.rollout // args.mini,
        num_ppo_epochs=args.epochs, total_episodes=args.rollout * iterations, response_length=args.response_length,
        local_rollout_forward_batch_size=args.rollout, stop_token="eos", temperature=1.0, learning_rate=3e-6,
        num_sample_generations=0, report_to="none", save_strategy="no", logging_steps=1,
        bf16=args.precision == "bf16", use_cpu=True,
        seed=0, dataloader_num_workers=0)

    generate_s = [0.0]
    real_generation = trl_ppo.batch_generation

    tokens = [0]

    def timed_generation(model, queries, *a, **k):
        started = time.perf_counter()
        out = real_generation(model, queries, *a, **k)
        generate_s[0] += time.perf_counter() - started
        # Response tokens up to and including the first EOS, as TRL truncates them.
        responses = out[0][:, queries.shape[1]:]
        is_eos = responses == tokenizer.eos_token_id
        first = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, torch.full_like(is_eos[:, 0], responses.shape[1], dtype=torch.long))
        tokens[0] += int(first.sum())
        return out

    trl_ppo.batch_generation = timed_generation
    marks = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):  # TRL calls this once per PPO iteration
            marks.append((time.perf_counter(), generate_s[0], tokens[0]))

    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=ref, reward_model=reward,
                         train_dataset=dataset, value_model=value, callbacks=[Clock()])
    torch.manual_seed(0)
    trainer.train()
    (t0, g0, n0), (t1, g1, n1) = marks[0], marks[-1]
    return {"seconds": t1 - t0, "samples": args.rollout * (len(marks) - 1), "tokens": n1 - n0, "marks": len(marks),
            "generate_s": g1 - g0, "score_s": None, "train_s": None}


def worker(args) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rlhfkit.cli import quiet_transformers

    quiet_transformers()
    if args.system.startswith("rlhfkit"):
        from rlhfkit.host_memory import keep_freed_memory

        keep_freed_memory()  # as the rlhfkit command line does
    work = Path(args.work)
    rm_folder, prompts = work / "rm", work / "prompts.jsonl"
    result = (run_ours if args.system.startswith("rlhfkit") else run_trl)(args, rm_folder, prompts, work)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,embedded")
    parser.add_argument("--systems", default="rlhfkit,rlhfkit-sampled,trl,trl-eager")
    parser.add_argument("--iterations", type=int, default=3, help="timed PPO iterations (after one warm-up)")
    parser.add_argument("--rollout", type=int, default=32)
    parser.add_argument("--mini", type=int, default=16)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--response-length", type=int, default=32)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                        help="both sides: bf16 autocast or fp32; auto = bf16 where the CPU runs it natively")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank of the rlhfkit-lora system")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--system", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    args.precision, why = resolve_bench_precision(args.precision)
    print(f"precision: {args.precision} ({why})")

    rows = []
    for model in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            make_reward_folder(model, work / "rm")
            prompts_file(work, args.rollout * (args.iterations + 1))
            for system in args.systems.split(","):
                cmd = [sys.executable, __file__, "--worker", "--system", system, "--model", model, "--work", tmp,
                       "--iterations", str(args.iterations), "--rollout", str(args.rollout), "--mini", str(args.mini),
                       "--micro", str(args.micro), "--epochs", str(args.epochs),
                       "--response-length", str(args.response_length), "--precision", args.precision,
                       "--lora-r", str(args.lora_r)]
                done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
                    rows.append({"model": model, "system": system, "error": tail})
                    continue
                rows.append({"model": model, "system": system, **json.loads(line[7:])})
    print(f"\nPPO, rollout {args.rollout}, mini-batch {args.mini}, micro-batch {args.micro}, {args.epochs} epoch(s), "
          f"{args.response_length} new tokens, {PRECISION_WORDS[args.precision]}, {args.iterations} timed iterations, {os.cpu_count()} CPUs\n")
    head = f"{'model':<9} {'system':<15} {'samples/s':>9} {'tokens/s':>9} {'generate':>9} {'score':>7} {'train':>7} {'peak RSS GB':>12}"
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<9} {r['system']:<15} failed: {r['error'][:80]}")
            continue
        share = lambda key: f"{100 * r[key] / r['seconds']:.0f}%" if r.get(key) is not None else "-"  # noqa: E731
        print(f"{r['model']:<9} {r['system']:<15} {r['samples'] / r['seconds']:>9.2f} {r['tokens'] / r['seconds']:>9.1f} "
              f"{share('generate_s'):>9} {share('score_s'):>7} {share('train_s'):>7} {r['peak_rss_gb']:>12.2f}")
    by = {(r["model"], r["system"]): r for r in rows if "error" not in r}
    for model in args.models.split(","):
        for name in ("rlhfkit-lora", "rlhfkit-lora-gc"):
            full, lora = by.get((model, "rlhfkit")), by.get((model, name))
            if full and lora:
                speed = (lora["samples"] / lora["seconds"]) / (full["samples"] / full["seconds"])
                print(f"{model}: {name} (r={args.lora_r})/rlhfkit samples/s = {speed:.2f}x, peak memory "
                      f"{lora['peak_rss_gb']:.2f} vs {full['peak_rss_gb']:.2f} GB "
                      f"({100 * lora['peak_rss_gb'] / full['peak_rss_gb']:.0f}%)")
        for mine in ("rlhfkit", "rlhfkit-sampled"):
            for other in ("trl", "trl-eager"):
                ours, theirs = by.get((model, mine)), by.get((model, other))
                if ours and theirs:
                    speed = (ours["samples"] / ours["seconds"]) / (theirs["samples"] / theirs["seconds"])
                    print(f"{model}: {mine}/{other} samples/s = {speed:.2f}x, peak memory "
                          f"{ours['peak_rss_gb']:.2f} vs {theirs['peak_rss_gb']:.2f} GB")


if __name__ == "__main__":
    main()
