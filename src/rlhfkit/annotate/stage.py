"""The `annotate` stage: sample K responses per prompt, rank them with the simulated annotator, write
`rankings.jsonl` (the annotator's output), `preferences.jsonl` (all ordered pairs, what the reward model
trains on) and, apart, `gold_scores.jsonl` (for analysis only; no trainer reads it). With `annotator: human`
the samples go into a labelling project, `labels.sqlite`, for people to rank instead (annotate/human.py).

Each response is sampled from a seed of its own (its index among all responses), so under a launcher each
process samples (and the gold scorer scores) its share of the prompts, and the main process, having gathered
them, ranks and writes exactly what one process would."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from rlhfkit.eval.gold import load_gold_scorer
from rlhfkit.annotate.human import check_project_free, guidelines_text, write_project
from rlhfkit.annotate.labels import noisy_ranking, ranking_pairs
from rlhfkit.config import AnnotateConfig
from rlhfkit.track.stage import tracked
from rlhfkit.data.text import prompt_text
from rlhfkit.data.tokenize import tokenize_prompt
from rlhfkit.models.loading import check_fits_context, load_causal_lm, load_tokenizer
from rlhfkit.runtime.precision import autocast
from rlhfkit.rollout.generate import sample_responses, sample_seeds
from rlhfkit.runtime.checkpoint import seed_everything
from rlhfkit.runtime.output_dir import prepare_output_dir
from rlhfkit.data.stage_records import prompt_records
from rlhfkit.runtime.device import resolve_device
from rlhfkit.runtime.distributed import all_gather, my_samples, processes
from rlhfkit.runtime.precision import resolve_precision


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


@tracked("annotate")
def run_annotate(config: AnnotateConfig) -> Path:
    device = resolve_device(config)
    procs = processes()
    resolve_precision(config, device.type)
    out = Path(config.output_dir or "runs/annotate")
    records = prompt_records(config.data, "train", config.num_prompts)
    human = config.annotator == "human"
    if human:  # checked before any sampling: a project may hold people's work; a guidelines file must exist
        check_project_free(out)
        guidelines = guidelines_text(config.guidelines)
    scorer = None if human else load_gold_scorer(config.gold_scorer)
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    model = load_causal_lm(config.model, config.dtype, config.trust_remote_code, config.attn_implementation, device)
    max_new = min(config.max_new_tokens, config.max_length - config.max_prompt_length)
    check_fits_context(model, config.max_prompt_length + max_new, "max_length")
    prepare_output_dir(out, config)
    seed_everything(config.seed)

    started = time.perf_counter()
    k = config.responses_per_prompt
    prompt_ids = [tokenize_prompt(tokenizer, r["prompt"], config.max_prompt_length, config.use_chat_template,
                                  config.system_prompt)
                  for r in records]
    # This process's prompts (all of them with one process), each prompt's k responses together.
    indices = my_samples(len(records), k, procs)
    with autocast(config.mixed_precision, device.type):
        samples = sample_responses(model, tokenizer, [prompt_ids[i // k] for i in indices], max_new,
                                   config.temperature, config.top_p, config.batch_size,
                                   progress=config.progress and procs.main, precision=config.mixed_precision,
                                   seeds=sample_seeds(config.seed, 0, indices))
    texts = [tokenizer.decode(s.response_ids, skip_special_tokens=True).strip() for s in samples]
    gold = scorer([prompt_text(records[i // k]["prompt"]) for i in indices], texts) if scorer else [0.0] * len(texts)
    shares = all_gather([(i, text, float(g), s.ended, len(s.response_ids))
                         for i, text, g, s in zip(indices, texts, gold, samples)], procs)
    if not procs.main:  # the main process writes everything
        return out
    _, texts, gold, ended, lengths = map(list, zip(*sorted(row for share in shares for row in share)))
    generate_s = time.perf_counter() - started
    if human:
        write_project(config, out, records, texts, guidelines, {
            "prompts": len(records), "responses": len(texts),
            "ended_with_eos": sum(ended) / max(len(texts), 1),
            "response_tokens_mean": sum(lengths) / max(len(texts), 1),
            "time/generate_s": generate_s, "time/total_s": time.perf_counter() - started})
        return out

    rng = random.Random(config.seed)
    rankings, preferences, gold_rows = [], [], []
    for i, record in enumerate(records):
        responses, scores = texts[i * k:(i + 1) * k], gold[i * k:(i + 1) * k]
        ranking = noisy_ranking(scores, config.label_temperature, rng)
        rankings.append({"prompt": record["prompt"], "responses": responses, "ranking": ranking})
        gold_rows.append({"prompt": record["prompt"], "responses": responses, "gold": scores})
        for better, worse in ranking_pairs(responses, ranking, scores, config.drop_ties):
            preferences.append({"prompt": record["prompt"], "chosen": responses[better],
                                "rejected": responses[worse]})
    _write_jsonl(out / "rankings.jsonl", rankings)
    _write_jsonl(out / "preferences.jsonl", preferences)
    _write_jsonl(out / "gold_scores.jsonl", gold_rows)
    gold_t = torch.tensor(gold)
    summary = {
        "prompts": len(records), "responses": len(texts), "pairs": len(preferences),
        "gold_mean": gold_t.mean().item(), "gold_std": gold_t.std().item() if len(gold) > 1 else 0.0,
        "ended_with_eos": sum(ended) / max(len(texts), 1),
        "response_tokens_mean": sum(lengths) / max(len(texts), 1),
        "time/generate_s": generate_s, "time/total_s": time.perf_counter() - started,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return out
