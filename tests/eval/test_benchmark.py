"""The capability benchmark: lm-eval on the policy and the reference, with rlhfkit's local task."""

import importlib.util
import json
import math

import pytest
import torch

from rlhfkit.errors import ConfigError
from rlhfkit.eval import benchmark
from rlhfkit.eval.benchmark import (Benchmark, check_benchmark, check_tasks, compare, parse_benchmark,
                                    run_benchmark)
from rlhfkit.eval.lm_eval_tasks.reply_choice_docs import N_CHOICES, build_docs, load

RECORDS = [{"prompt": "Hi", "completion": "Hello there."}, {"prompt": "Hi", "completion": "Hey."},
           {"prompt": "Who are you?", "completion": "A bot."}, {"prompt": "Age?", "completion": "Two."},
           {"prompt": "Food?", "completion": "Bytes."}, {"prompt": "Sky?", "completion": "Blue."}]


def test_reply_choice_docs_hold_the_own_reply_at_the_label_and_three_others():
    docs = build_docs(RECORDS, seed=1)
    assert len(docs) == len(RECORDS)
    for record, doc in zip(RECORDS, docs):
        assert doc["question"] == record["prompt"] and doc["choices"][doc["label"]] == record["completion"]
        assert len(doc["choices"]) == len(set(doc["choices"])) == N_CHOICES
        # No distractor is another reply to the same question ("Hi" has two).
        own = {r["completion"] for r in RECORDS if r["prompt"] == record["prompt"]}
        assert own & set(doc["choices"]) == {record["completion"]}
    assert build_docs(RECORDS, seed=1) == docs and build_docs(RECORDS, seed=2) != docs
    with pytest.raises(ValueError, match="only 2 replies to other questions; need 3"):
        build_docs(RECORDS[:4])


def test_the_local_task_is_built_from_the_held_out_split_only():
    from rlhfkit.data.stage_records import embedded_sft_split

    train, held_out = embedded_sft_split()
    docs = load()["test"]
    assert len(docs) == len(held_out) == 504
    # Shuffled, so that a limit reads a sample of every topic: the first 100 documents come from all over the
    # held-out records (which follow the corpus's topic files), not from their first 100.
    assert sorted(d["question"] for d in docs) == sorted(r["prompt"] for r in held_out)
    index = {(r["prompt"], r["completion"]): i for i, r in enumerate(held_out)}
    positions = sorted(index[d["question"], d["choices"][d["label"]]] for d in docs.select(range(100)))
    assert positions[-1] > 0.8 * len(held_out) and positions[50] > 0.25 * len(held_out)
    assert not {d["question"] for d in docs} & {r["prompt"] for r in train}
    labels = [d["label"] for d in docs]
    # The answer's position is drawn uniformly: no position holds it much more often than chance would.
    assert all(abs(labels.count(i) - len(labels) / N_CHOICES) < 4 * math.sqrt(len(labels) * 3 / 16)
               for i in range(N_CHOICES))


def test_benchmark_spec_errors_are_one_clear_line(monkeypatch):
    assert parse_benchmark("lm-eval:a, b") == Benchmark("lm-eval", ("a", "b"))
    for bad in ("hellaswag", "lm-eval:", "helm:mmlu"):
        with pytest.raises(ConfigError, match=r"key 'benchmark': expected lm-eval:TASK\[,TASK\]"):
            parse_benchmark(bad)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"lm-eval is not installed \(a dependency of rlhfkit\); pip install lm-eval"):
        check_benchmark("lm-eval:rlhfkit_reply_choice")


def test_an_unknown_task_is_refused_by_lm_evals_own_index(monkeypatch):
    class Index:  # lm-eval's full index takes ~10 s to build; its task list is all check_tasks reads
        all_tasks = ["hellaswag", "arc_easy", "rlhfkit_reply_choice"]

    monkeypatch.setattr(benchmark, "_task_manager", lambda local_only: Index())
    check_tasks(Benchmark("lm-eval", ("rlhfkit_reply_choice", "arc_easy")))
    with pytest.raises(ConfigError, match=r"lm-eval has no task 'hellaswagg' \(local tasks: rlhfkit_reply_choice;"):
        check_tasks(Benchmark("lm-eval", ("hellaswagg",)))


def test_compare_puts_both_models_and_the_change_side_by_side():
    ours = {"t": {"n": 10, "version": 1.0, "metrics": {"acc": {"value": 0.6, "stderr": 0.3, "higher_is_better": True},
                                                        "f": {"value": 2.0, "stderr": None, "higher_is_better": False}}}}
    theirs = {"t": {"n": 10, "version": 1.0, "metrics": {"acc": {"value": 0.5, "stderr": 0.4, "higher_is_better": True},
                                                          "f": {"value": 1.0, "stderr": 0.1, "higher_is_better": False}}}}
    rows = compare(ours, theirs)["t"]["metrics"]
    assert rows["acc"]["delta"] == pytest.approx(0.1) and rows["acc"]["delta_stderr"] == pytest.approx(0.5)
    assert rows["f"]["delta"] == 1.0 and rows["f"]["delta_stderr"] is None
    assert compare(ours, ours, same_model=True)["t"]["metrics"]["acc"]["delta_stderr"] == 0.0


def _by_hand(model, tokenizer, docs) -> tuple[float, float]:
    """lm-eval's multiple choice, computed directly: the summed log-probability of " " + choice after
    "Question: q\\nAnswer:", argmax over choices; acc_norm divides by the choice's length in characters (the
    space excluded)."""
    acc = norm = 0
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        scores = []
        for choice in doc["choices"]:
            ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
            whole = tokenizer(context + " " + choice, add_special_tokens=False)["input_ids"]
            cont = whole[len(ctx):]
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            scores.append(sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)))
        acc += max(range(N_CHOICES), key=lambda i: scores[i]) == doc["label"]
        norm += max(range(N_CHOICES), key=lambda i: scores[i] / len(doc["choices"][i])) == doc["label"]
    return acc / len(docs), norm / len(docs)


@pytest.mark.parametrize("batch_size", [3, 16])  # lm-eval pads each batch: the scores must not depend on it
def test_lm_eval_scores_the_loaded_model_as_a_direct_computation_does(tiny_model, tokenizer, batch_size):
    tiny_model.eval()
    scores = run_benchmark(Benchmark("lm-eval", ("rlhfkit_reply_choice",)), tiny_model, tokenizer,
                           batch_size=batch_size, limit=24)["rlhfkit_reply_choice"]
    acc, acc_norm = _by_hand(tiny_model, tokenizer, list(load()["test"])[:24])
    assert scores["n"] == 24
    assert scores["metrics"]["acc"]["value"] == pytest.approx(acc)
    assert scores["metrics"]["acc_norm"]["value"] == pytest.approx(acc_norm)
    # A mean's standard error: sqrt(p (1 - p) / (n - 1)), lm-eval's closed form.
    assert scores["metrics"]["acc"]["stderr"] == pytest.approx(math.sqrt(acc * (1 - acc) / 23))
    assert tiny_model.training is False


def test_eval_writes_the_benchmark_of_both_models(tmp_path, monkeypatch):
    import rlhfkit.eval.evaluate as evaluate
    from rlhfkit.eval.evaluate import run_eval
    from rlhfkit.models.loading import load_tokenizer
    from rlhfkit.models.tiny import build_tiny_model

    from ..trainers.helpers import tiny_config, write_jsonl

    other = tmp_path / "other"
    tok = load_tokenizer("tiny")
    build_tiny_model(tok, seed=5).save_pretrained(other)
    tok.save_pretrained(other)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello"}, {"prompt": "Good day"}])
    out = tmp_path / "ev"
    batch_sizes = []

    def spy(bench, model, tokenizer, batch_size, *args):
        batch_sizes.append(batch_size)
        return run_benchmark(bench, model, tokenizer, batch_size, *args)

    monkeypatch.setattr(evaluate, "run_benchmark", spy)
    run_eval(tiny_config("eval", data=prompts, output_dir=out, ref_model=other, samples_per_prompt=1, max_new_tokens=4,
                         benchmark="lm-eval:rlhfkit_reply_choice", benchmark_limit=16, benchmark_batch_size=5,
                         progress=False))
    assert batch_sizes == [5, 5]  # the policy's and the reference's, not the sampling batch
    result = json.loads((out / "eval.json").read_text())["benchmark"]
    assert result["harness"] == "lm-eval" and result["limit"] == 16
    rows = result["tasks"]["rlhfkit_reply_choice"]["metrics"]
    assert set(rows) == {"acc", "acc_norm"}
    for row in rows.values():
        assert row["delta"] == pytest.approx(row["policy"] - row["reference"])
        assert row["delta_stderr"] == pytest.approx(math.hypot(row["policy_stderr"], row["reference_stderr"]))
    saved = json.loads((out / "reference_benchmark.json").read_text())
    assert saved["key"]["tasks"] == ["rlhfkit_reply_choice"]
    assert saved["scores"]["rlhfkit_reply_choice"]["metrics"]["acc"]["value"] == rows["acc"]["reference"]


def test_a_benchmark_without_lm_eval_task_is_exit_2_before_any_output(tmp_path, capsys):
    from rlhfkit.cli import main

    out = tmp_path / "ev"
    code = main(["eval", "--preset", "tiny", "--output-dir", str(out), "--benchmark", "lm-eval:nosuchtask"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not out.exists()
    assert err.startswith("rlhfkit eval: error: key 'benchmark': lm-eval has no task 'nosuchtask'") and "\n" not in err
