"""`README.md` model cards for every folder a stage saves a model in, in Hugging Face's model-card format.

The front matter is HF's model-card metadata (built with `huggingface_hub.ModelCardData`): `library_name`,
`base_model` (a Hub id, only when one is known: the embedded default's, a folder in the HF cache, or the one an
upstream rlhfkit card names; the Hub refuses a `base_model` that is not a model id), `tags` (`rlhfkit` and the
stage), `datasets` (when the data is a Hub dataset in the HF cache), `license` when inherited, and `model-index`
with the evaluation's numbers once a pipeline has evaluated the model. The body names the stage, the models and
data it started from, the evaluation and every resolved setting, so the folder can be pushed to a hub as it is.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import yaml

EMBEDDED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the embedded default (models/embedded.py), Apache-2.0
EMBEDDED_LICENSE = "apache-2.0"

STAGES = {
    "sft": ("supervised fine-tuning on prompt/completion data (loss on completion tokens only)", "text-generation"),
    "reward": ("a reward model: the LM trunk and a scalar head, trained with the Bradley-Terry loss on preference "
               "pairs", "text-classification"),
    "dpo": ("direct preference optimisation on (prompt, chosen, rejected) pairs", "text-generation"),
    "ppo": ("PPO against a reward model, with a per-token KL penalty to a frozen reference", "text-generation"),
    "grpo": ("GRPO: group-relative advantages over K samples per prompt, no critic", "text-generation"),
    "rloo": ("RLOO: REINFORCE with a leave-one-out baseline over K samples per prompt, KL in the reward",
             "text-generation"),
}
TAGS = {"sft": ["sft"], "reward": ["reward-model"], "dpo": ["dpo", "rlhf"], "ppo": ["ppo", "rlhf"],
        "grpo": ["grpo", "rlhf"], "rloo": ["rloo", "rlhf"]}
# (eval.json prefix, which is also the model-index metric type; label), in the order a card lists them.
EVAL_METRICS = [("gold_reward", "Gold score (held-out)"), ("proxy_reward", "Reward-model score"),
                ("kl_exact", "KL to reference (nats, exact)"),
                ("kl_to_reference", "KL to reference (nats, sampled k1)"),
                ("win_rate_vs_reference", "Gold win rate vs reference"),
                ("response_length", "Response length (tokens)"), ("ended_with_eos", "Ended with EOS")]


def read_card_metadata(folder: Path) -> dict:
    """The YAML front matter of FOLDER/README.md ({} when there is none)."""
    path = Path(folder) / "README.md"
    if not path.is_file():
        return {}
    text = path.read_text(encoding="utf-8")
    match = re.match(r"^---\s*\n(.*?)\n---\s*\n", text, re.S)
    try:
        data = yaml.safe_load(match.group(1)) if match else None
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _cache_id(value: str | None, kind: str) -> str | None:
    """'org/name' of a folder inside the HF cache (…/models--org--name/snapshots/<sha>), else None."""
    for part in Path(str(value)).parts if value else ():
        if part.startswith(f"{kind}--"):
            return part[len(kind) + 2:].replace("--", "/")
    return None


def hub_lineage(model: str | None) -> tuple[str | None, str | None]:
    """(Hub id of the model at the root of `model`'s lineage, its license), as far as they are known."""
    if model in (None, "", "embedded"):
        return EMBEDDED_ID, EMBEDDED_LICENSE
    if model == "tiny":
        return None, None
    cached = _cache_id(model, "models")
    if cached:
        return cached, None
    upstream = read_card_metadata(Path(model))
    if "rlhfkit" in (upstream.get("tags") or []):  # a folder an earlier stage wrote: inherit its lineage
        return upstream.get("base_model"), upstream.get("license")
    return None, None


def _describe_model(model: str | None) -> str:
    if model in (None, "", "embedded"):
        return f"the embedded default ({EMBEDDED_ID}, converted offline from a PyPI wheel)"
    if model == "tiny":
        return "rlhfkit's tiny random Llama (hidden size 64, 2 layers; for tests)"
    root, _ = hub_lineage(model)
    return f"`{model}`" + (f" (from {root})" if root and root != model else "")


def _describe_data(config, stage: str) -> str:
    data = getattr(config, "data", None)
    if data:
        return f"`{data}`"
    return ("the chatterbot corpus (chatterbot-corpus on PyPI, the embedded default), its training split"
            if stage in ("sft", "ppo", "grpo", "rloo") else "none given")


def _eval_rows(evaluation: dict) -> list[tuple[str, str, float, list]]:
    rows = []
    for key, label in EVAL_METRICS:
        if f"{key}_mean" in evaluation:
            rows.append((key, label, evaluation[f"{key}_mean"], evaluation.get(f"{key}_ci95") or []))
    return rows


def card_metadata(config, stage: str, folder: Path, evaluation: dict | None = None) -> dict:
    """The front matter of a stage's card, as HF's ModelCardData writes it."""
    from huggingface_hub import EvalResult, ModelCardData

    base, license_ = hub_lineage(getattr(config, "model", None))
    datasets = [d for d in (_cache_id(getattr(config, "data", None), "datasets"),) if d]
    results = None
    if evaluation:
        dataset = _cache_id(evaluation.get("data"), "datasets") or "prompts"
        results = [EvalResult(task_type="text-generation", dataset_type=dataset,
                              dataset_name=f"held-out prompts ({evaluation.get('n_prompts')} x "
                                           f"{evaluation.get('samples_per_prompt')} samples)",
                              metric_type=key, metric_name=label, metric_value=round(float(mean), 6))
                   for key, label, mean, _ in _eval_rows(evaluation)]
    adapter = (Path(folder) / "adapter_config.json").is_file()
    card = ModelCardData(
        library_name="peft" if adapter else "transformers", base_model=base, license=license_,
        datasets=datasets or None, tags=["rlhfkit", *TAGS.get(stage, [stage])],
        pipeline_tag=STAGES.get(stage, ("", "text-generation"))[1], model_name=Path(folder).resolve().name,
        eval_results=results or None)
    meta = card.to_dict()
    if not results:
        meta.pop("model_name", None)  # ModelCardData keeps it for the model-index only
    return meta


def card_text(config, stage: str, folder: Path, evaluation: dict | None = None) -> str:
    """The whole README.md: front matter, then what the model is, its evaluation and its settings."""
    folder = Path(folder)
    meta = card_metadata(config, stage, folder, evaluation)
    what, _ = STAGES.get(stage, (stage, ""))
    lines = [f"# {folder.resolve().name}", "",
             f"Trained with rlhfkit's `{stage}` stage: {what}.", "",
             "| | |", "|---|---|",
             f"| Stage | `{stage}` |",
             f"| Base model | {_describe_model(getattr(config, 'model', None))} |"]
    for field, label in (("ref_model", "Reference model"), ("reward_model", "Reward model"),
                         ("reward_function", "Reward functions")):
        if getattr(config, field, None):
            lines.append(f"| {label} | `{getattr(config, field)}` |")
    lines.append(f"| Data | {_describe_data(config, stage)} |")
    if getattr(config, "eval_data", None):
        lines.append(f"| Held-out data | `{config.eval_data}` |")
    if getattr(config, "lora_r", 0):
        lines.append(f"| LoRA | rank {config.lora_r}, alpha {getattr(config, 'lora_alpha', '')} |")
    if evaluation:
        lines += ["", "## Evaluation", "",
                  f"{evaluation.get('n_prompts')} held-out prompts x {evaluation.get('samples_per_prompt')} samples, "
                  f"against the reference `{evaluation.get('ref_model')}`; gold scorer "
                  f"`{evaluation.get('gold_scorer')}`; mean and 95% interval over prompts.", "",
                  "| metric | mean | 95% interval |", "|---|---|---|"]
        for _, label, mean, ci in _eval_rows(evaluation):
            interval = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if len(ci) == 2 else ""
            lines.append(f"| {label} | {mean:.3f} | {interval} |")
    loader = "AutoModelForSequenceClassification" if stage == "reward" else "AutoModelForCausalLM"
    if meta.get("library_name") == "peft":
        loading = ["from peft import AutoPeftModelForCausalLM", "",
                   f'model = AutoPeftModelForCausalLM.from_pretrained("{folder}")  # or its Hub id, once pushed']
    else:
        loading = [f"from transformers import {loader}, AutoTokenizer", "",
                   f'model = {loader}.from_pretrained("{folder}")  # or its Hub id, once pushed',
                   f'tokenizer = AutoTokenizer.from_pretrained("{folder}")']
    settings = yaml.safe_dump(dataclasses.asdict(config), sort_keys=False).rstrip()
    lines += ["", "## Loading", "", "```python", *loading, "```",
              "", "## Settings", "", "Every resolved setting of the stage (also in `config.yaml`):", "",
              "```yaml", settings, "```", ""]
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip()
    return f"---\n{front}\n---\n\n" + "\n".join(lines)


def write_model_card(folder: Path, config, stage: str, evaluation: dict | None = None) -> Path:
    """Write FOLDER/README.md (and merged/README.md beside a LoRA adapter's merged model) for a stage's model;
    `evaluation`: an eval.json of this model, when known."""
    folder = Path(folder)
    path = folder / "README.md"
    path.write_text(card_text(config, stage, folder, evaluation), encoding="utf-8")
    merged = folder / "merged"
    if (merged / "config.json").is_file():
        (merged / "README.md").write_text(card_text(config, stage, merged, evaluation), encoding="utf-8")
    return path
