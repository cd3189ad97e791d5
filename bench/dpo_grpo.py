"""DPO and GRPO throughput and memory: rlhfkit against the latest TRL's DPOTrainer and GRPOTrainer, one run.

    python3 -m venv /work/venv-trl                          # TRL's side, in a venv of its own (the dev venv
    /work/venv-trl/bin/pip install torch==2.13.0 trl==1.16.0 requests -e .   # keeps trl 1.12 for bench/ppo.py)
    python bench/dpo_grpo.py                                # both algorithms, tiny and embedded models
    python bench/dpo_grpo.py --algos grpo --models tiny --steps 3 --grpo-beta 0,0.04
    python bench/dpo_grpo.py --trl-python /path/to/python   # TRL workers run under that interpreter

Each (algorithm, system, model) runs in its own Python process, so peak memory (max RSS, which includes loading
the models) is measured separately. rlhfkit workers run under this interpreter; TRL workers under --trl-python
(default: /work/venv-trl/bin/python or .venv-trl/bin/python if one exists, else this interpreter). Both get the
same model folder, the same tokenizer object (rlhfkit's loader: pad token, chat template), the same data, the
same precision (`--precision`: `auto` is bf16 autocast where the CPU runs bf16 natively and fp32 where it would
only emulate it; `fp32` or `bf16` force one on both sides), and no evaluation or checkpoints while timed. The first `--warmup` optimizer steps are not
timed; a step's time runs from the end of the previous step to the end of this one (TRL: TrainerCallback
on_step_end; rlhfkit: time/step_s of metrics.jsonl).

DPO: the same preference pairs, conversational ({"prompt": [user], "chosen": [assistant], "rejected": [assistant]},
chatterbot prompts, the pair's own answer as chosen and another prompt's answer as rejected), the same
per-device batch, gradient accumulation, max_length, beta, sigmoid loss, learning rate, linear schedule without
warm-up. samples/s = preference pairs per second of training steps.
- `rlhfkit`: the reference model held in memory (a no-grad forward per micro-batch).
- `rlhfkit-gc`: the same with `gradient_checkpointing`, as TRL's default has it.
- `rlhfkit-precompute`: `precompute_ref_logprobs`; the reference pass over the data runs once before training
  and is NOT timed (only training steps are), nor for `trl-precompute`.
- `rlhfkit-precompute-gc`: both, the settings `trl-precompute` runs with.
- `trl`, `trl-precompute`: TRL as its users get it (`precompute_ref_log_probs` for the second): its defaults,
  which include gradient checkpointing and transformers' sdpa attention.
- `trl-fast`: TRL without gradient checkpointing and with the eager attention rlhfkit picks on the CPU, i.e.
  TRL tuned the way rlhfkit runs, to show how much of the difference those two settings make.

GRPO: the same conversational prompts, the same Python reward (bench/rewards.py: VADER compound of the
completion), one rollout of prompts x num_generations completions per optimizer step (TRL:
per_device_train_batch_size = rollout / accumulation, steps_per_generation = gradient_accumulation_steps, so
one TRL optimizer step is exactly one generation round), max_new_tokens = max_completion_length, temperature
1, top_p 1, no top-k, one pass (num_iterations 1), token-mean loss (TRL's 'dapo'), (r - mean) / std group
advantages (TRL's scale_rewards 'group'), the same beta (0 loads no reference model in either). samples/s =
completions per second of whole iterations (generation, scoring and update); tokens/s = completion tokens
(EOS included) per second.
- `rlhfkit`, `rlhfkit-gc`, `trl`, `trl-fast` as for DPO.

rlhfkit workers call `rlhfkit.host_memory.keep_freed_memory()` first, as the rlhfkit command does.
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
BENCH = Path(__file__).resolve().parent
REWARD = "rewards:vader_compound"  # bench/rewards.py; bench/ is put on sys.path in every worker
TRL_VENVS = (Path("/work/venv-trl/bin/python"), ROOT / ".venv-trl" / "bin" / "python")
sys.path.insert(0, str(BENCH))
from precision_choice import MIXED, PRECISION_WORDS, resolve_bench_precision  # noqa: E402

DPO_SYSTEMS = "rlhfkit,rlhfkit-gc,rlhfkit-precompute,rlhfkit-precompute-gc,trl,trl-precompute,trl-fast"
GRPO_SYSTEMS = "rlhfkit,rlhfkit-gc,trl,trl-fast"


# --------------------------------------------------------------------------------------------------
# Data (made once per model by the parent, read by every worker)
# --------------------------------------------------------------------------------------------------
def write_pairs(path: Path, n: int) -> None:
    """n conversational preference pairs from the chatterbot corpus: chosen = the prompt's own answer,
    rejected = the answer of the next distinct prompt."""
    from rlhfkit.data.stage_records import embedded_sft_split

    train, _ = embedded_sft_split()
    seen, records = set(), []
    for r in train:
        if r["prompt"] not in seen and isinstance(r["prompt"], str) and isinstance(r["completion"], str):
            seen.add(r["prompt"])
            records.append(r)
    if len(records) < n + 1:
        raise SystemExit(f"only {len(records)} distinct prompts; ask for fewer pairs")
    rows = []
    for i in range(n):
        a, b = records[i], records[i + 1]
        rows.append({"prompt": [{"role": "user", "content": a["prompt"]}],
                     "chosen": [{"role": "assistant", "content": a["completion"]}],
                     "rejected": [{"role": "assistant", "content": b["completion"]}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_prompts(path: Path, n: int) -> None:
    from rlhfkit.data.stage_records import embedded_prompts

    prompts = embedded_prompts("train")[:n]
    path.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": r["prompt"]}]}) + "\n"
                            for r in prompts))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------------
# DPO workers
# --------------------------------------------------------------------------------------------------
def dpo_ours(args, work: Path) -> dict:
    from rlhfkit.config_parsing import build_config
    from rlhfkit.data.tokenize import tokenize_preference
    from rlhfkit.models.loading import load_tokenizer
    from rlhfkit.trainers.dpo import run_dpo
    from rlhfkit.runtime.metrics_log import read_metrics

    out = work / args.system
    overrides = dict(model=args.model, data=work / "pairs.jsonl", eval_fraction=0.0, output_dir=out,
                     max_steps=args.steps + args.warmup, batch_size=args.batch, gradient_accumulation_steps=args.accum,
                     max_prompt_length=args.max_prompt_length, max_length=args.max_length, beta=args.beta,
                     loss_type="sigmoid", learning_rate=1e-6, lr_scheduler="linear", warmup_ratio=0.0,
                     mixed_precision=MIXED[args.precision], precompute_ref_logprobs=args.system.startswith("rlhfkit-precompute"),
                     gradient_checkpointing=args.system.endswith("-gc"),
                     save_every=0, eval_every=0, log_every=1, progress=False)
    config = build_config("dpo", overrides=[(k, str(v)) for k, v in overrides.items()])
    config.save_every = 10**9  # no checkpoint inside the timed window (the final one is written after it)
    tokenizer = load_tokenizer(args.model)
    lengths = [tokenize_preference(tokenizer, r, config.max_prompt_length, config.max_length)
               for r in read_jsonl(work / "pairs.jsonl")]
    run_dpo(config)
    rows = read_metrics(out / "metrics.jsonl")[args.warmup:]
    return {"seconds": sum(r["time/step_s"] for r in rows),
            "samples": round(sum(r["perf/samples_per_s"] * r["time/step_s"] for r in rows)), "steps": len(rows),
            **pair_lengths([(len(x["prompt_ids"]), len(x["chosen_ids"]), len(x["rejected_ids"])) for x in lengths]),
            "settings": f"batch_size={config.batch_size} accum={config.gradient_accumulation_steps} "
                        f"max_prompt_length={config.max_prompt_length} max_length={config.max_length} "
                        f"beta={config.beta} loss={config.loss_type} precompute={config.precompute_ref_logprobs} "
                        f"gradient_checkpointing={config.gradient_checkpointing} "
                        f"attn={config.attn_implementation}(eager) mixed_precision={config.mixed_precision}"}


def pair_lengths(triples: list[tuple[int, int, int]]) -> dict:
    """Mean tokens a pair puts through a forward (prompt twice, chosen, rejected), and the longest sequence."""
    return {"tokens_per_pair": sum(2 * p + c + r for p, c, r in triples) / len(triples),
            "longest": max(p + max(c, r) for p, c, r in triples)}


def trl_model(folder, system: str):
    from transformers import AutoModelForCausalLM

    # "trl-fast" gives TRL the eager attention rlhfkit uses on the CPU; the others keep transformers' pick (sdpa).
    attention = {"attn_implementation": "eager"} if system == "trl-fast" else {}
    return AutoModelForCausalLM.from_pretrained(folder, **attention)


class Marks:
    """on_step_end timestamps (one per optimizer step) and counters sampled at each."""

    def __init__(self):
        self.marks: list[tuple[float, dict]] = []
        self.counters: dict[str, float] = {}

    def callback(self):
        from transformers import TrainerCallback

        marks = self

        class Clock(TrainerCallback):
            def on_step_end(self, *a, **k):
                marks.marks.append((time.perf_counter(), dict(marks.counters)))

        return Clock()

    def add(self, key: str, value: float) -> None:
        self.counters[key] = self.counters.get(key, 0.0) + value

    def window(self, warmup: int) -> tuple[float, int, dict]:
        """Seconds, steps and counter deltas from the end of step `warmup` to the end of the last step."""
        (t0, c0), (t1, c1) = self.marks[warmup - 1], self.marks[-1]
        return t1 - t0, len(self.marks) - warmup, {k: c1.get(k, 0.0) - c0.get(k, 0.0) for k in c1}


def dpo_trl(args, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from rlhfkit.models.loading import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(args.model)
    dataset = Dataset.from_list(read_jsonl(work / "pairs.jsonl"))
    model = trl_model(resolve_model_path(args.model), args.system)
    fast = args.system == "trl-fast"
    config = DPOConfig(
        output_dir=str(work / args.system), per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.accum, max_length=args.max_length, beta=args.beta, loss_type=["sigmoid"],
        learning_rate=1e-6, lr_scheduler_type="linear", warmup_steps=0, max_steps=args.steps + args.warmup,
        precompute_ref_log_probs=args.system == "trl-precompute", precompute_ref_batch_size=args.batch,
        gradient_checkpointing=not fast, bf16=args.precision == "bf16", use_cpu=True, seed=0, dataloader_num_workers=0,
        report_to="none", save_strategy="no", eval_strategy="no", logging_steps=1, disable_tqdm=True)
    marks = Marks()
    # ref_model=None: TRL loads the reference itself from the same folder (dtype and attention of the policy),
    # or, with precompute_ref_log_probs, scores the data with the policy before training and loads none.
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[marks.callback()])
    ds = trainer.train_dataset
    lengths = pair_lengths([(len(p), len(c), len(r)) for p, c, r in
                            zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])])
    torch.manual_seed(0)
    trainer.train()
    seconds, steps, _ = marks.window(args.warmup)
    ref = "none (precomputed)" if trainer.ref_model is None else type(trainer.ref_model).__name__
    return {"seconds": seconds, "samples": steps * args.batch * args.accum, "steps": steps, **lengths,
            "settings": f"per_device_train_batch_size={config.per_device_train_batch_size} "
                        f"accum={config.gradient_accumulation_steps} max_length={config.max_length} "
                        f"beta={config.beta} loss={config.loss_type} precompute={config.precompute_ref_log_probs} "
                        f"gradient_checkpointing={config.gradient_checkpointing} "
                        f"attn={model.config._attn_implementation} bf16={config.bf16} ref_model={ref}"}


# --------------------------------------------------------------------------------------------------
# GRPO workers
# --------------------------------------------------------------------------------------------------
def grpo_ours(args, work: Path) -> dict:
    from rlhfkit.config_parsing import build_config
    from rlhfkit.trainers.grpo import run_grpo
    from rlhfkit.runtime.metrics_log import read_metrics

    out = work / f"{args.system}-beta{args.beta}"
    rollout = args.prompts * args.generations
    overrides = dict(model=args.model, data=work / "prompts.jsonl", reward_function=REWARD, output_dir=out,
                     max_steps=args.steps + args.warmup, prompts_per_step=args.prompts,
                     num_generations=args.generations, mini_batch_size=0, gradient_accumulation_steps=args.accum,
                     forward_batch_size=0, num_iterations=1, max_new_tokens=args.new_tokens, temperature=1.0,
                     top_p=1.0, beta=args.beta, advantage="grpo", loss_aggregation="token-mean",
                     learning_rate=1e-6, lr_scheduler="constant", max_prompt_length=args.max_prompt_length,
                     max_length=args.max_prompt_length + args.new_tokens, mixed_precision=MIXED[args.precision],
                     gradient_checkpointing=args.system.endswith("-gc"),
                     save_every=0, sample_every=0, log_every=1, progress=False)
    config = build_config("grpo", overrides=[(k, str(v)) for k, v in overrides.items()])
    config.save_every = 10**9
    run_grpo(config)
    rows = read_metrics(out / "metrics.jsonl")[args.warmup:]
    return {"seconds": sum(r["time/step_s"] for r in rows), "samples": rollout * len(rows), "steps": len(rows),
            "tokens": sum(r["response/length_mean"] * rollout for r in rows),
            "generate_s": sum(r["time/rollout_s"] for r in rows), "score_s": sum(r["time/score_s"] for r in rows),
            "train_s": sum(r["time/train_s"] for r in rows),
            "settings": f"prompts_per_step={config.prompts_per_step} num_generations={config.num_generations} "
                        f"mini_batch={config.mini_batch_size or rollout} accum={config.gradient_accumulation_steps} "
                        f"(micro {rollout // config.gradient_accumulation_steps}) num_iterations={config.num_iterations} "
                        f"max_new_tokens={config.max_new_tokens} T={config.temperature} beta={config.beta} "
                        f"loss={config.loss_aggregation} advantage={config.advantage} attn=eager "
                        f"gradient_checkpointing={config.gradient_checkpointing} "
                        f"mixed_precision={config.mixed_precision}"}


def grpo_trl(args, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from rewards import vader_compound
    from rlhfkit.models.loading import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(args.model)
    dataset = Dataset.from_list(read_jsonl(work / "prompts.jsonl"))
    model = trl_model(resolve_model_path(args.model), args.system)
    fast = args.system == "trl-fast"
    rollout = args.prompts * args.generations
    config = GRPOConfig(
        # One optimizer step = gradient_accumulation_steps micro-batches of per_device_train_batch_size
        # completions = the rollout; steps_per_generation (default: gradient_accumulation_steps) makes one
        # generation round of generation_batch_size = rollout completions per optimizer step.
        output_dir=str(work / args.system), per_device_train_batch_size=rollout // args.accum,
        gradient_accumulation_steps=args.accum, num_generations=args.generations,
        max_completion_length=args.new_tokens, temperature=1.0, top_p=1.0, top_k=0, beta=args.beta,
        num_iterations=1, loss_type="dapo", scale_rewards="group", learning_rate=1e-6, lr_scheduler_type="constant",
        max_steps=args.steps + args.warmup, gradient_checkpointing=not fast, bf16=args.precision == "bf16", use_cpu=True,
        use_vllm=False, seed=0, dataloader_num_workers=0, report_to="none", save_strategy="no", eval_strategy="no",
        logging_steps=1, log_completions=False, disable_tqdm=True)
    assert config.generation_batch_size == rollout and config.steps_per_generation == args.accum, \
        (config.generation_batch_size, config.steps_per_generation)
    marks = Marks()
    generate_single_turn = GRPOTrainer._generate_single_turn
    generate_and_score = GRPOTrainer._generate_and_score_completions

    def timed_generation(self, *a, **k):
        started = time.perf_counter()
        completion_ids, logprobs = generate_single_turn(self, *a, **k)
        marks.add("generate_s", time.perf_counter() - started)
        marks.add("tokens", sum(len(c) for c in completion_ids))  # up to and including the first EOS
        return completion_ids, logprobs

    def timed_rollout(self, *a, **k):
        started = time.perf_counter()
        out = generate_and_score(self, *a, **k)
        marks.add("rollout_s", time.perf_counter() - started)
        return out

    GRPOTrainer._generate_single_turn = timed_generation
    GRPOTrainer._generate_and_score_completions = timed_rollout
    trainer = GRPOTrainer(model=model, reward_funcs=[vader_compound], args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[marks.callback()])
    torch.manual_seed(0)
    trainer.train()
    seconds, steps, counts = marks.window(args.warmup)
    return {"seconds": seconds, "samples": rollout * steps, "steps": steps, "tokens": counts.get("tokens", 0.0),
            "generate_s": counts.get("generate_s", 0.0),
            "score_s": counts.get("rollout_s", 0.0) - counts.get("generate_s", 0.0),
            "train_s": seconds - counts.get("rollout_s", 0.0),
            "settings": f"per_device_train_batch_size={config.per_device_train_batch_size} "
                        f"accum={config.gradient_accumulation_steps} generation_batch_size={config.generation_batch_size} "
                        f"steps_per_generation={config.steps_per_generation} num_generations={config.num_generations} "
                        f"num_iterations={config.num_iterations} max_completion_length={config.max_completion_length} "
                        f"T={config.temperature} top_k={config.top_k} beta={config.beta} loss={config.loss_type} "
                        f"scale_rewards={config.scale_rewards} gradient_checkpointing={config.gradient_checkpointing} "
                        f"attn={model.config._attn_implementation} bf16={config.bf16} "
                        f"ref_model={'none' if trainer.ref_model is None else 'loaded'}"}


WORKERS = {("dpo", False): dpo_ours, ("dpo", True): dpo_trl, ("grpo", False): grpo_ours, ("grpo", True): grpo_trl}


def worker(args) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(BENCH))
    from rlhfkit.cli import quiet_transformers

    quiet_transformers()
    if not args.system.startswith("trl"):
        from rlhfkit.host_memory import keep_freed_memory

        keep_freed_memory()  # as the rlhfkit command line does
    result = WORKERS[(args.algo, args.system.startswith("trl"))](args, Path(args.work))
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("RESULT " + json.dumps(result))


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------
def default_trl_python() -> str:
    return next((str(p) for p in TRL_VENVS if p.is_file()), sys.executable)


def versions(python: str) -> str:
    probe = "import torch, transformers, trl; print(trl.__version__, transformers.__version__, torch.__version__)"
    done = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    if done.returncode:
        return "not installed"
    trl, transformers, torch = done.stdout.split()
    return f"TRL {trl} (transformers {transformers}, torch {torch})"


def run_worker(args, algo: str, system: str, model: str, work: str, beta: float) -> dict:
    python = args.trl_python if system.startswith("trl") else sys.executable
    cmd = [python, __file__, "--worker", "--algo", algo, "--system", system, "--model", model, "--work", work,
           "--beta", str(beta), "--precision", args.precision]
    for key in ("steps", "warmup", "batch", "accum", "max_prompt_length", "max_length", "prompts", "generations",
                "new_tokens"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    row = {"algo": algo, "model": model, "system": system, "beta": beta, "wall_s": wall}
    if line is None:
        lines = done.stderr.strip().splitlines() or ["no output"]
        print(f"--- {algo} {system} {model} failed; last lines of its stderr:", *lines[-15:], sep="\n", file=sys.stderr)
        return {**row, "error": lines[-1]}
    return {**row, **json.loads(line[7:])}


def rate(r: dict) -> float:
    return r["samples"] / r["seconds"]


def compare(rows: list[dict], pairs: list[tuple[str, str]], label) -> None:
    by = {(r["model"], r["beta"], r["system"]): r for r in rows if "error" not in r}
    for model, beta in dict.fromkeys((r["model"], r["beta"]) for r in rows):
        for mine, other in pairs:
            ours, theirs = by.get((model, beta, mine)), by.get((model, beta, other))
            if ours and theirs:
                speed = rate(ours) / rate(theirs)
                memory = ours["peak_rss_gb"] <= theirs["peak_rss_gb"]
                verdict = "met" if speed >= 2 and memory else "NOT met"
                print(f"{label(model, beta)}: {mine}/{other} samples/s = {speed:.2f}x, peak memory "
                      f"{ours['peak_rss_gb']:.2f} vs {theirs['peak_rss_gb']:.2f} GB (target >= 2x at no more memory: "
                      f"{verdict})")


def report_dpo(args, rows: list[dict], trl_version: str) -> None:
    print(f"\nDPO, {trl_version}: batch {args.batch} pairs x {args.accum} accumulation = {args.batch * args.accum} pairs "
          f"per step, max_length {args.max_length}, beta {args.beta}, sigmoid, {PRECISION_WORDS[args.precision]}, {args.warmup} warm-up + "
          f"{args.steps} timed steps (training steps only), {os.cpu_count()} CPUs\n")
    head = (f"{'model':<9} {'system':<22} {'pairs/s':>8} {'s/step':>7} {'tokens/pair':>12} {'longest':>8} "
            f"{'peak RSS GB':>12} {'process s':>10}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<9} {r['system']:<22} failed: {r['error'][:90]}")
            continue
        print(f"{r['model']:<9} {r['system']:<22} {rate(r):>8.2f} {r['seconds'] / r['steps']:>7.2f} "
              f"{r['tokens_per_pair']:>12.1f} {r['longest']:>8} {r['peak_rss_gb']:>12.2f} {r['wall_s']:>10.1f}")
    print()
    compare(rows, [("rlhfkit", "trl"), ("rlhfkit-gc", "trl"), ("rlhfkit", "trl-fast"),
                   ("rlhfkit-precompute", "trl-precompute"), ("rlhfkit-precompute-gc", "trl-precompute"),
                   ("rlhfkit-precompute", "trl")],
            lambda model, beta: f"DPO {model}")
    print_settings(rows)


def report_grpo(args, rows: list[dict], trl_version: str) -> None:
    rollout = args.prompts * args.generations
    print(f"\nGRPO, {trl_version}: {args.prompts} prompts x {args.generations} generations = {rollout} completions per "
          f"step (one optimizer step, {args.accum} micro-batches of {rollout // args.accum}), {args.new_tokens} new "
          f"tokens max, temperature 1, reward {REWARD}, {PRECISION_WORDS[args.precision]}, {args.warmup} warm-up + {args.steps} timed "
          f"steps, {os.cpu_count()} CPUs\n")
    head = (f"{'model':<9} {'beta':>5} {'system':<10} {'samples/s':>9} {'tokens/s':>9} {'tok/compl':>9} {'generate':>9} "
            f"{'score':>6} {'train':>6} {'peak RSS GB':>12} {'process s':>10}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<9} {r['beta']:>5} {r['system']:<10} failed: {r['error'][:90]}")
            continue
        share = lambda key: f"{100 * r[key] / r['seconds']:.0f}%"  # noqa: E731
        print(f"{r['model']:<9} {r['beta']:>5} {r['system']:<10} {rate(r):>9.2f} {r['tokens'] / r['seconds']:>9.1f} "
              f"{r['tokens'] / r['samples']:>9.1f} {share('generate_s'):>9} {share('score_s'):>6} "
              f"{share('train_s'):>6} {r['peak_rss_gb']:>12.2f} {r['wall_s']:>10.1f}")
    print("(generate: sampling; score: rewards, reference and old log-probs, advantages; train: the update and the "
          "rest of the step)\n")
    compare(rows, [("rlhfkit", "trl"), ("rlhfkit-gc", "trl"), ("rlhfkit", "trl-fast")],
            lambda model, beta: f"GRPO {model} beta {beta}")
    print_settings(rows)


def print_settings(rows: list[dict]) -> None:
    print("\nsettings as each system resolved them (first model):")
    first = rows[0]["model"] if rows else None
    for r in rows:
        if r["model"] == first and "settings" in r:
            print(f"  {r['system']:<22} {r['settings']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algos", default="dpo,grpo")
    parser.add_argument("--models", default="tiny,embedded")
    parser.add_argument("--dpo-systems", default=DPO_SYSTEMS)
    parser.add_argument("--grpo-systems", default=GRPO_SYSTEMS)
    parser.add_argument("--trl-python", default=default_trl_python(),
                        help="interpreter with the latest TRL for the trl* workers (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps, after the warm-up ones")
    parser.add_argument("--warmup", type=int, default=1, help="optimizer steps run first and not timed")
    parser.add_argument("--batch", type=int, default=8, help="DPO: pairs per micro-batch (per-device batch)")
    parser.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step (DPO and GRPO)")
    parser.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    parser.add_argument("--max-prompt-length", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=128, help="DPO: prompt + response tokens")
    parser.add_argument("--prompts", type=int, default=4, help="GRPO: prompts per step")
    parser.add_argument("--generations", type=int, default=4, help="GRPO: completions per prompt")
    parser.add_argument("--new-tokens", type=int, default=32, help="GRPO: max new tokens per completion")
    parser.add_argument("--grpo-beta", default="0.0", help="GRPO KL coefficient(s), comma-separated (e.g. 0,0.04)")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                        help="both sides: bf16 autocast or fp32; auto = bf16 where the CPU runs it natively")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--algo", help=argparse.SUPPRESS)
    parser.add_argument("--system", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if (args.prompts * args.generations) % args.accum:
        parser.error("--accum must divide prompts x generations")
    args.precision, why = resolve_bench_precision(args.precision)
    print(f"precision: {args.precision} ({why})")

    trl_version = versions(args.trl_python)
    print(f"rlhfkit workers: {sys.executable}; TRL workers: {args.trl_python}, {trl_version}", flush=True)
    steps = args.steps + args.warmup
    results = {}
    for algo in args.algos.split(","):
        systems = (args.dpo_systems if algo == "dpo" else args.grpo_systems).split(",")
        betas = [args.beta] if algo == "dpo" else [float(b) for b in args.grpo_beta.split(",")]
        rows = []
        for model in args.models.split(","):
            with tempfile.TemporaryDirectory(prefix=f"bench-{algo}-") as tmp:
                if algo == "dpo":
                    write_pairs(Path(tmp) / "pairs.jsonl", args.batch * args.accum * steps)
                else:
                    write_prompts(Path(tmp) / "prompts.jsonl", args.prompts * steps)
                for beta in betas:
                    for system in systems:
                        print(f"{algo} {model} {system}" + (f" beta {beta}" if algo == "grpo" else "") + " ...",
                              end=" ", flush=True)
                        row = run_worker(args, algo, system, model, tmp, beta)
                        print("failed" if "error" in row else f"{rate(row):.2f} samples/s", flush=True)
                        rows.append(row)
        results[algo] = rows
    for algo, rows in results.items():
        (report_dpo if algo == "dpo" else report_grpo)(args, rows, trl_version)


if __name__ == "__main__":
    main()
