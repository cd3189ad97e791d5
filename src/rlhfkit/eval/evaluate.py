"""`rlhfkit eval`: how good is a policy, by the gold scorer and the reward model, and how far has it moved?

For every prompt, `samples_per_prompt` responses are sampled from the policy and as many from the reference.
Reported, each as a mean with a 95% interval computed over prompts (samples of one prompt are correlated):
- gold_reward: the gold scorer's score of the policy's responses;
- proxy_reward: the reward model's score (when a reward model is given);
- kl_exact: sum over response positions of the exact per-token KL(pi_t || pi_ref_t) = sum_v pi_t(v) log(pi_t(v) /
  pi_ref_t(v)) over the whole vocabulary (core.kl.exact_token_kl), at the sampling temperature: never negative,
  and its mean over y ~ pi is the sequence-level KL(pi || pi_ref) in nats (the chain rule of the KL), with less
  variance than the sampled estimate below. The headline KL of the report and the pipeline's KL budget;
- kl_to_reference: sum over response tokens of log pi(y_t) - log pi_ref(y_t), for y ~ pi: the sampled (k1)
  estimate of the same KL, as training logs it (`objective/kl`); unbiased but noisy, and negative on some
  responses. Both at the sampling temperature (with top_p < 1 the samples come from a truncated distribution,
  which neither accounts for; keep top_p = 1 to measure KL);
- win_rate_vs_reference: policy sample i against reference sample i of the same prompt, judged by the gold
  scorer, ties counting one half. The reference's samples are drawn from their own seed (seed + 1), so they
  do not depend on the policy: a pipeline samples them once and its other evaluations reuse them
  (`reference_samples`, checked against `reference.json`). A model evaluated against itself is scored on
  those very samples (one generation pass; win rate 1/2);
- response_length: response tokens (EOS included);
- benchmark (with `benchmark`, lm-eval:TASK[,TASK]): a capability benchmark of the policy and the reference,
  and its change (eval.benchmark); the reference's scores are reused from `reference_samples` when the same;
- best_of_n (with `best_of_n` N > 0 and a reward model): per prompt, N more samples of the reference (seed + 2);
  for n = 1, 2, 4, ... N, the gold score of the one the reward model scores highest among the first n, with
  its closed-form KL log n - (n-1)/n (core.best_of_n), as Gao et al. 2022 compare RL with it.

Every response is sampled from a seed of its own (the run's seed, + 1 for the reference, + 2 for best-of-n, and
its index), so under a launcher each process samples and scores its share of the prompts; the main process
gathers the shares, computes the statistics and writes, exactly as one process would. The capability
benchmark runs in the main process alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rlhfkit.eval.benchmark import check_benchmark, check_tasks, compare, run_benchmark
from rlhfkit.eval.gold import load_gold_scorer
from rlhfkit.config import EvalConfig
from rlhfkit.track.stage import tracked
from rlhfkit.core.best_of_n import best_of_n_kl, best_of_n_pick, best_of_n_sizes
from rlhfkit.core.stats import mean_ci95, win_rate
from rlhfkit.data.length_buckets import bucket_overhead
from rlhfkit.data.text import prompt_text
from rlhfkit.data.tokenize import tokenize_prompt
from rlhfkit.models.loading import check_fits_context, load_causal_lm, load_tokenizer
from rlhfkit.runtime.precision import autocast
from rlhfkit.models.reward_model import load_reward_model
from rlhfkit.rollout.batch import build_rollout_batch
from rlhfkit.rollout.generate import sample_responses, sample_seeds
from rlhfkit.rollout.scoring import RewardScorer, response_logprobs_and_kl
from rlhfkit.runtime.checkpoint import seed_everything
from rlhfkit.runtime.output_dir import prepare_output_dir
from rlhfkit.data.stage_records import prompt_records
from rlhfkit.errors import ConfigError
from rlhfkit.models.loading import first_line
from rlhfkit.runtime.device import resolve_device, stage_device
from rlhfkit.runtime.distributed import all_gather, my_samples, processes
from rlhfkit.runtime.precision import resolve_precision


@torch.no_grad()
def _sample_and_score(policy, ref, tokenizer, records, prompt_ids, seeds: list[int], config: EvalConfig,
                      reward: RewardScorer | None):
    """Samples of `policy` (one seed each) with their KL to `ref` (None: no KL, no scoring pass) and proxy
    scores, in batches."""
    from tqdm.auto import tqdm

    out = {"texts": [], "kl": [], "kl_exact": [], "proxy": [], "length": [], "ended": []}
    starts = range(0, len(prompt_ids), config.batch_size)
    for start in tqdm(starts, desc="eval", unit="batch", disable=not config.progress or not processes().main,
                      dynamic_ncols=True):
        ids, recs = prompt_ids[start:start + config.batch_size], records[start:start + config.batch_size]
        samples = sample_responses(policy, tokenizer, ids, config.max_new_tokens, config.temperature,
                                   config.top_p, batch_size=len(ids), precision=config.mixed_precision,
                                   seeds=seeds[start:start + config.batch_size])
        batch = build_rollout_batch(ids, [s.response_ids for s in samples], [s.ended for s in samples],
                                    tokenizer.pad_token_id, config.device)
        texts = [tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in samples]
        mask = batch.response_mask
        if ref is policy:  # KL of a model to itself: 0, without a scoring pass
            out["kl"] += [0.0] * len(samples)
            out["kl_exact"] += [0.0] * len(samples)
        elif ref is not None:
            # One forward of each model gives the sampled tokens' log-probs and the exact per-token KL.
            logp, logq, kl_exact = (torch.zeros_like(mask) for _ in range(3))  # (B, R) each
            for rows, sub in batch.length_buckets(bucket_overhead(policy)):  # rows of similar length together
                width = sub.response_mask.shape[1]
                logp[rows, :width], logq[rows, :width], kl_exact[rows, :width] = response_logprobs_and_kl(
                    policy, ref, sub, config.temperature)
            out["kl"] += torch.where(mask.bool(), logp - logq, torch.zeros_like(logp)).sum(1).tolist()
            out["kl_exact"] += kl_exact.sum(1).tolist()
        out["length"] += mask.sum(1).tolist()
        out["ended"] += batch.ended.tolist()
        out["texts"] += texts
        if reward is not None:
            out["proxy"] += reward(batch, [r["prompt"] for r in recs], texts).tolist()
    return out


def _best_of_n(ref, tokenizer, records: list[dict], prompt_ids: list[list[int]], config: EvalConfig,
               reward: RewardScorer, gold) -> tuple[list[dict], list[dict]]:
    """The best-of-n baseline: N = config.best_of_n samples of the reference per prompt (its own seed, seed + 2),
    scored by the reward model and the gold scorer. Returns one row per reported n, and per prompt its N
    responses with both scores (best_of_n.jsonl)."""
    N = config.best_of_n
    procs = processes()
    indices = my_samples(len(records), N, procs)
    repeated = [records[i // N] for i in indices]
    with autocast(config.mixed_precision, stage_device(config).type):
        drawn = _sample_and_score(ref, None, tokenizer, repeated, [prompt_ids[i // N] for i in indices],
                                  sample_seeds(config.seed + 2, 0, indices), config, reward)
    drawn["gold"] = _gold(gold, repeated, drawn["texts"])
    drawn = _gathered(indices, {name: drawn[name] for name in ("texts", "proxy", "gold")}, procs)
    gold_scores = drawn["gold"]
    proxy = torch.tensor(drawn["proxy"], dtype=torch.float64).view(len(records), N)  # (P, N)
    gold_t = torch.tensor(gold_scores, dtype=torch.float64).view(len(records), N)  # (P, N)
    rows = []
    for n in best_of_n_sizes(N):
        chosen_gold, chosen_proxy = best_of_n_pick(proxy, gold_t, n)  # (P,) each
        stats, proxy_stats = mean_ci95(chosen_gold), mean_ci95(chosen_proxy)
        rows.append({"n": n, "kl": best_of_n_kl(n), "gold_reward_mean": stats["mean"],
                     "gold_reward_ci95": stats["ci95"], "proxy_reward_mean": proxy_stats["mean"],
                     "proxy_reward_ci95": proxy_stats["ci95"]})
    samples = [{"prompt": r["prompt"], "responses": drawn["texts"][i * N:(i + 1) * N], "proxy": proxy[i].tolist(),
                "gold": gold_t[i].tolist()} for i, r in enumerate(records)]
    return rows, samples


def _reference_key(config: EvalConfig, records: list[dict]) -> dict:
    """Everything the reference's samples depend on: equal keys give equal samples (same code and machine)."""
    from hashlib import sha256

    prompts = sha256(json.dumps([r["prompt"] for r in records], ensure_ascii=False).encode()).hexdigest()
    ref = str(config.ref_model or config.model)
    return {"ref_model": str(Path(ref).resolve()) if Path(ref).exists() else ref, "prompts_sha256": prompts,
            "samples_per_prompt": config.samples_per_prompt, "seed": config.seed,
            "max_new_tokens": config.max_new_tokens, "temperature": config.temperature, "top_p": config.top_p,
            "max_prompt_length": config.max_prompt_length, "use_chat_template": config.use_chat_template,
            "system_prompt": config.system_prompt, "mixed_precision": config.mixed_precision, "dtype": config.dtype}


def _reused_reference(folder: str, key: dict, n: int) -> list[str]:
    """The reference responses of an earlier eval in `folder`, after checking they were sampled as ours would be."""
    where = Path(folder)
    try:
        theirs_key = json.loads((where / "reference.json").read_text())
        rows = [json.loads(line) for line in (where / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    except (OSError, ValueError) as exc:
        raise ConfigError(f"reference_samples: {where}: no reusable reference samples ({first_line(exc)})") from None
    differ = sorted(k for k in key if theirs_key.get(k) != key[k])
    if differ or len(rows) != n:
        what = ", ".join(differ) if differ else f"{len(rows)} samples, not {n}"
        raise ConfigError(f"reference_samples: {where / 'reference.json'}: sampled differently ({what})")
    return [row["reference_response"] for row in rows]


def _benchmark(bench, policy, ref, tokenizer, config: EvalConfig, key: dict, out: Path) -> dict:
    """The benchmark's scores of both models, compared. The reference's depend on it alone: written to
    reference_benchmark.json, and read back from `reference_samples` when that one was scored the same way."""
    ref_key = {"ref_model": key["ref_model"], "tasks": list(bench.tasks), "limit": config.benchmark_limit,
               "seed": config.seed, "dtype": config.dtype, "mixed_precision": config.mixed_precision}
    reference = None
    if config.reference_samples:
        earlier = Path(config.reference_samples) / "reference_benchmark.json"
        if earlier.is_file():
            saved = json.loads(earlier.read_text())
            reference = saved["scores"] if saved.get("key") == ref_key else None
    with autocast(config.mixed_precision, stage_device(config).type):
        print(f"eval: benchmark {','.join(bench.tasks)} (lm-eval) on the policy")
        ours = run_benchmark(bench, policy, tokenizer, config.benchmark_batch_size, config.benchmark_limit,
                             config.seed)
        if reference is None and ref is policy:
            reference = ours
        elif reference is None:
            print(f"eval: benchmark {','.join(bench.tasks)} (lm-eval) on the reference")
            reference = run_benchmark(bench, ref, tokenizer, config.benchmark_batch_size, config.benchmark_limit,
                                      config.seed)
    (out / "reference_benchmark.json").write_text(json.dumps({"key": ref_key, "scores": reference}, indent=2))
    return {"harness": bench.harness, "limit": config.benchmark_limit,
            "tasks": compare(ours, reference, same_model=ref is policy)}


def _gathered(indices: list[int], columns: dict[str, list], procs) -> dict[str, list]:
    """Each column with every process's values (this one's are at global `indices`), in global order."""
    shares = all_gather((indices, columns), procs)
    order = sorted((i, s, j) for s, (share, _) in enumerate(shares) for j, i in enumerate(share))
    return {name: [shares[s][1][name][j] for _, s, j in order] for name in columns}


def _gold(gold, records: list[dict], texts: list[str]) -> list[float]:
    """The gold scores of these responses (none to score: a process with no share)."""
    return gold([prompt_text(r["prompt"]) for r in records], texts) if texts else []


def _per_prompt(values: list[float], k: int) -> torch.Tensor:
    """Average the k consecutive samples of each prompt: (N * k,) -> (N,)."""
    return torch.tensor(values, dtype=torch.float64).view(-1, k).mean(1)


@tracked("eval")
def run_eval(config: EvalConfig) -> Path:
    device = resolve_device(config)
    procs = processes()
    resolve_precision(config, device.type)
    out = Path(config.output_dir or "runs/eval")
    records = prompt_records(config.data, "eval", config.num_prompts)
    gold = load_gold_scorer(config.gold_scorer)
    bench = check_benchmark(config.benchmark) if config.benchmark else None
    if bench is not None:
        check_tasks(bench)
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    policy = load_causal_lm(config.model, config.dtype, config.trust_remote_code, config.attn_implementation,
                            device).eval()
    ref = policy if not config.ref_model or config.ref_model == config.model else \
        load_causal_lm(config.ref_model, config.dtype, config.trust_remote_code, config.attn_implementation,
                       device).eval()
    reward = None
    if config.reward_model:
        rm_tokenizer = load_tokenizer(config.reward_model, config.trust_remote_code)
        rm = load_reward_model(config.reward_model, rm_tokenizer.pad_token_id, config.dtype, config.trust_remote_code,
                               config.attn_implementation, device)
        reward = RewardScorer(rm.eval(), rm_tokenizer, tokenizer, config.max_prompt_length, config.use_chat_template,
                              config.system_prompt)
    # eval's responses are not bounded by max_length: a prompt and max_new_tokens must fit.
    if config.best_of_n and reward is None:
        raise ConfigError("key 'best_of_n': the best-of-n baseline ranks samples with a reward model; give "
                          "--reward-model, or set best_of_n to 0")
    for loaded in [policy, ref] + ([rm] if reward is not None else []):
        check_fits_context(loaded, config.max_prompt_length + config.max_new_tokens, "max_new_tokens")
    sizes = {m.get_output_embeddings().weight.shape[0] for m in (policy, ref)}
    if len(sizes) > 1:  # the exact KL sums over one vocabulary
        raise ConfigError(f"ref_model: {config.ref_model}: its vocabulary ({max(sizes)} or {min(sizes)} tokens) "
                          f"differs from the policy's {config.model}; KL needs one vocabulary")
    k = config.samples_per_prompt
    repeated = [r for r in records for _ in range(k)]
    key = _reference_key(config, repeated)
    reused = _reused_reference(config.reference_samples, key, len(repeated)) if config.reference_samples else None
    prepare_output_dir(out, config)
    seed_everything(config.seed)

    prompt_ids = [tokenize_prompt(tokenizer, r["prompt"], config.max_prompt_length, config.use_chat_template,
                                  config.system_prompt)
                  for r in repeated]
    mine = my_samples(len(records), k, procs)  # this process's samples (all of them with one process)
    # The reference evaluated against itself (a pipeline's starting policy): its samples are drawn from the
    # reference's seed and serve as both sides, so one generation pass instead of two, the win rate is 1/2
    # exactly, and later evaluations reuse the very samples this one was scored on.
    policy_seed = config.seed + 1 if ref is policy else config.seed
    with autocast(config.mixed_precision, device.type):
        ours = _sample_and_score(policy, ref, tokenizer, [repeated[i] for i in mine], [prompt_ids[i] for i in mine],
                                 sample_seeds(policy_seed, 0, mine), config, reward)
    # Samples of the reference from their own seed (seed + 1): they depend on the reference alone, so other
    # evaluations can reuse them.
    if reused is not None:
        theirs = {"texts": [reused[i] for i in mine]}
    elif ref is policy:
        theirs = {"texts": ours["texts"]}
    else:
        with autocast(config.mixed_precision, device.type):
            theirs = _sample_and_score(ref, None, tokenizer, [repeated[i] for i in mine],
                                       [prompt_ids[i] for i in mine], sample_seeds(config.seed + 1, 0, mine),
                                       config, None)
    ours["gold"] = _gold(gold, [repeated[i] for i in mine], ours["texts"])
    ours["reference_texts"] = theirs["texts"]
    ours["reference_gold"] = _gold(gold, [repeated[i] for i in mine], theirs["texts"])
    if reward is None:
        del ours["proxy"]  # nothing to gather
    ours = _gathered(mine, ours, procs)
    theirs = {"texts": ours["reference_texts"]}
    gold_ours, gold_theirs = ours["gold"], ours["reference_gold"]

    metrics = {"gold_reward": _per_prompt(gold_ours, k), "kl_exact": _per_prompt(ours["kl_exact"], k),
               "kl_to_reference": _per_prompt(ours["kl"], k),
               "win_rate_vs_reference": _per_prompt(win_rate(torch.tensor(gold_ours), torch.tensor(gold_theirs)).tolist(), k),
               "response_length": _per_prompt(ours["length"], k),
               "ended_with_eos": _per_prompt([float(e) for e in ours["ended"]], k),
               "reference_gold_reward": _per_prompt(gold_theirs, k)}
    if reward is not None:
        metrics["proxy_reward"] = _per_prompt(ours["proxy"], k)
    result = {"model": str(config.model), "ref_model": str(config.ref_model or config.model), "data": config.data,
              "reward_model": config.reward_model, "gold_scorer": config.gold_scorer,
              "n": len(repeated), "n_prompts": len(records), "samples_per_prompt": k}
    for name, values in metrics.items():
        stats = mean_ci95(values)
        result[f"{name}_mean"] = stats["mean"]
        result[f"{name}_ci95"] = stats["ci95"]
        result[f"{name}_std"] = stats["std"]
    if config.best_of_n:
        # prompt_ids holds each prompt k times in a row: every k-th is each prompt once.
        result["best_of_n"], best_of_n_samples = _best_of_n(ref, tokenizer, records, prompt_ids[::k], config, reward,
                                                           gold)
    if not procs.main:  # the main process writes (and runs the benchmark)
        return out
    if config.best_of_n:
        with open(out / "best_of_n.jsonl", "w", encoding="utf-8") as handle:
            for row in best_of_n_samples:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    if bench is not None:
        result["benchmark"] = _benchmark(bench, policy, ref, tokenizer, config, key, out)
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    (out / "reference.json").write_text(json.dumps(key, indent=2))
    with open(out / "samples.jsonl", "w", encoding="utf-8") as handle:
        for i, record in enumerate(repeated):
            row = {"prompt": record["prompt"], "response": ours["texts"][i], "gold": gold_ours[i],
                   "kl": ours["kl"][i], "kl_exact": ours["kl_exact"][i], "reference_response": theirs["texts"][i],
                   "reference_gold": gold_theirs[i]}
            if reward is not None:
                row["proxy"] = ours["proxy"][i]
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k.endswith("_mean") or k == "n"}))
    return out
