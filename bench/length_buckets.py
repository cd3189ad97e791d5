"""Forwards in length buckets (data/length_buckets.py) against one padded forward, on the embedded model.

For the reward model's and SFT's training steps (forward + backward) on batches drawn from the embedded corpus as
the demo draws them, with glibc keeping freed memory as the rlhfkit command has it, prints the share of padding and the seconds per step both ways. It also fits the cost of a
forward as `a + b * tokens` over a few shapes, and prints `a / b`: a forward's fixed cost in tokens of work, the
number `OVERHEAD_TOKENS` stands for.

    python bench/length_buckets.py [--steps 3] [--precision auto|fp32|bf16]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch


def pair_batches(tokenizer, n_batches: int, pairs: int, seed: int = 0):
    """(chosen, rejected) pairs as the demo's reward model sees them: a prompt and two of the corpus's replies,
    cut at 32 tokens as the annotation's responses are."""
    from rlhfkit.data.collate import collate_pairs
    from rlhfkit.data.loading import load_chatterbot_sft
    from rlhfkit.data.tokenize import tokenize_prompt

    records = load_chatterbot_sft()
    rng = random.Random(seed)
    batches = []
    for _ in range(n_batches):
        examples = []
        for record in rng.sample(records, pairs):
            other = rng.choice(records)["completion"]
            ids = tokenize_prompt(tokenizer, record["prompt"], 64, True, "")
            reply = [tokenizer(t, add_special_tokens=False)["input_ids"][:31] + [tokenizer.eos_token_id]
                     for t in (record["completion"], other)]
            examples.append({"prompt_ids": ids, "chosen_ids": reply[0], "rejected_ids": reply[1]})
        batches.append(collate_pairs(examples, tokenizer.pad_token_id))
    return batches


def sft_batches(tokenizer, n_batches: int, size: int, seed: int = 0):
    from rlhfkit.data.collate import collate_sft
    from rlhfkit.data.loading import load_chatterbot_sft
    from rlhfkit.data.tokenize import tokenize_sft

    records = load_chatterbot_sft()
    rng = random.Random(seed)
    return [collate_sft([tokenize_sft(tokenizer, r, 64, 128, True, "") for r in rng.sample(records, size)],
                        tokenizer.pad_token_id) for _ in range(n_batches)]


def time_steps(step, batches) -> float:
    step(batches[0])  # warm-up
    times = []
    for batch in batches:
        start = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    args = parser.parse_args()
    from rlhfkit.host_memory import keep_freed_memory

    keep_freed_memory()  # as the rlhfkit command does: otherwise every large tensor is a fresh mapping to fault in

    import rlhfkit.models.reward_model as reward_model
    import rlhfkit.trainers.sft as sft
    from rlhfkit.data.length_buckets import OVERHEAD_TOKENS
    from rlhfkit.models.loading import load_causal_lm, load_tokenizer
    from rlhfkit.runtime.precision import autocast, choose_precision
    from rlhfkit.trainers.reward import pair_scores

    precision = choose_precision({"fp32": "no"}.get(args.precision, args.precision), "cpu").mode
    tokenizer = load_tokenizer(None)
    policy = load_causal_lm(None)
    rm = reward_model.load_reward_model(None, tokenizer.pad_token_id)

    def reward_step(batch):
        with autocast(precision, "cpu"):
            chosen, rejected = pair_scores(rm, batch)
            loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
        loss.backward()
        rm.zero_grad(set_to_none=True)

    def sft_step(batch):
        with autocast(precision, "cpu"):
            loss, _ = sft.sft_loss(policy, batch, float(batch["loss_mask"].sum()))
        loss.backward()
        policy.zero_grad(set_to_none=True)

    cases = [("reward (16 pairs)", reward_step, pair_batches(tokenizer, args.steps + 1, 16), reward_model),
             ("sft (8 examples)", sft_step, sft_batches(tokenizer, args.steps + 1, 8), sft)]
    print(f"precision {precision}, torch threads {torch.get_num_threads()}, {args.steps} steps each (median)")
    print(f"{'step':<20} {'real/padded tokens':>18} {'one forward s':>14} {'buckets s':>10} {'speed-up':>9}")
    for name, step, batches, module in cases:
        real = sum(int(b["attention_mask"].sum()) for b in batches)
        padded = sum(b["attention_mask"].numel() for b in batches)
        original = module.bucket_overhead
        module.bucket_overhead = lambda model: None
        try:
            whole = time_steps(step, batches)
        finally:
            module.bucket_overhead = original
        buckets = time_steps(step, batches)
        print(f"{name:<20} {real / padded:>18.2f} {whole:>14.2f} {buckets:>10.2f} {whole / buckets:>8.2f}x")

    # A forward's fixed cost: no-grad trunk forwards of b rows x w columns, fitted as a + c * tokens.
    shapes = [(1, 16), (2, 16), (4, 32), (8, 32), (16, 32), (32, 48)]
    xs, ys = [], []
    with torch.no_grad(), autocast(precision, "cpu"):
        for b, w in shapes:
            ids = torch.randint(100, 1000, (b, w))
            rm.base_model(input_ids=ids)
            start = time.perf_counter()
            for _ in range(3):
                rm.base_model(input_ids=ids)
            xs.append(b * w)
            ys.append((time.perf_counter() - start) / 3)
    mx, my = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    intercept = my - slope * mx
    print(f"forward cost fit: {intercept * 1e3:.1f} ms + {slope * 1e3:.3f} ms/token -> a forward's fixed cost "
          f"= {intercept / slope:.0f} tokens (OVERHEAD_TOKENS['cpu'] = {OVERHEAD_TOKENS['cpu']})")


if __name__ == "__main__":
    main()
