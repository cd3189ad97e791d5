"""The human loop end to end on the tiny model: `rlhfkit annotate --annotator human` writes the project; a
pipeline with `annotator: human` stops after sampling and, once the labels are exported, continues with the
reward model on them."""

import json

import yaml

from rlhfkit.cli import main, runner
from rlhfkit.label.assign import next_item, submit
from rlhfkit.label.auth import add_annotator
from rlhfkit.label.labels import Label
from rlhfkit.label.store import Store
from rlhfkit.pipeline import load_pipeline, run_pipeline

from ..trainers.helpers import write_jsonl

PROMPTS = [{"prompt": f"Tell me about topic {i}"} for i in range(4)]
SMALL = {"max_new_tokens": 8, "max_prompt_length": 48, "max_length": 96, "batch_size": 12, "progress": False}


def test_annotate_human_writes_a_labelling_project_and_the_next_commands(tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    guide = tmp_path / "guide.md"
    guide.write_text("# Guidelines\nPrefer the kind answer.\n")
    out = tmp_path / "ann"
    argv = ["annotate", "--preset", "tiny", "--annotator", "human", "--overlap", "2", "--guidelines", str(guide),
            "--data", str(prompts), "--output-dir", str(out), "--responses-per-prompt", "3",
            "--mixed-precision", "no", *[x for k, v in SMALL.items() for x in (f"--{k.replace('_', '-')}", str(v))]]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    project = out / "labels.sqlite"
    for command in (f"rlhfkit label add-annotator {project} NAME", f"rlhfkit label serve {project}",
                    f"rlhfkit label export {project} --output-dir {out}"):
        assert command in printed
    store = Store(project)
    items = store.items()
    assert [i["prompt"] for i in items] == [p["prompt"] for p in PROMPTS]
    assert all(len(i["responses"]) == 3 and all(isinstance(r, str) for r in i["responses"]) for i in items)
    assert (store.overlap, store.guidelines) == (2, "# Guidelines\nPrefer the kind answer.\n")
    assert store.settings["source"]["responses_per_prompt"] == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["annotator"] == "human" and summary["prompts"] == 4 and summary["responses"] == 12
    assert not (out / "preferences.jsonl").exists()  # nobody has ranked anything yet
    # Again into the same folder: refused before any sampling, the project (maybe with labels) untouched.
    assert main(argv) == 2
    assert "labels.sqlite: already exists" in capsys.readouterr().err
    missing = ["annotate", "--preset", "tiny", "--annotator", "human", "--guidelines", str(tmp_path / "nope.md"),
               "--output-dir", str(tmp_path / "other")]
    assert main(missing) == 2
    assert "nope.md: guidelines file not found" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
    assert main(["annotate", "--annotator", "robot"]) == 2
    assert "key 'annotator': 'robot' is not one of simulated, human" in capsys.readouterr().err


def test_pipeline_stops_after_sampling_and_continues_from_the_export(tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    run = tmp_path / "run"
    spec = {"output_dir": str(run), "model": "tiny", "mixed_precision": "no", "stages": ["annotate", "reward"],
            "annotate": {"annotator": "human", "data": str(prompts), "responses_per_prompt": 3, **SMALL},
            "reward": {"max_steps": 2, "batch_size": 4, "max_prompt_length": 48, "max_length": 96, "eval_every": 0,
                       "save_every": 0, "warmup_ratio": 0.0, "eval_fraction": 0.0, "progress": False}}
    (tmp_path / "pipe.yaml").write_text(yaml.safe_dump(spec))
    assert run_pipeline(load_pipeline(tmp_path / "pipe.yaml"), runner) is None
    printed = capsys.readouterr().out
    project = run / "annotate" / "labels.sqlite"
    assert f"waiting for people's labels before reward: {project}" in printed
    assert f"rlhfkit label export {project} --output-dir {run / 'annotate'}" in printed
    assert (run / "annotate" / ".done").exists() and not (run / "reward").exists()

    # People rank (here through the same functions the API calls), then the labels are exported.
    store = Store(project)
    add_annotator(store, "alice")
    alice = store.annotators()[0].id
    while (item := next_item(store, alice)) is not None:
        submit(store, alice, Label(item["item_id"], ranks=(1, 2, 3)) if item["item_id"] != 2 else
               Label(item["item_id"], skip=True))
    assert main(["label", "export", str(project), "--output-dir", str(run / "annotate")]) == 0
    prefs = [json.loads(line) for line in (run / "annotate" / "preferences.jsonl").read_text().splitlines()]
    assert len(prefs) <= 9 and {p["item_id"] for p in prefs} <= {1, 3, 4}  # 3 ranked items, 3 pairs each at most
    capsys.readouterr()

    # The same pipeline again: annotation is done, the reward model trains on the exported pairs.
    assert run_pipeline(load_pipeline(tmp_path / "pipe.yaml"), runner) == run
    printed = capsys.readouterr().out
    assert "annotate already done" in printed and "running reward" in printed
    assert (run / "reward" / ".done").exists() and (run / "reward" / "model.safetensors").exists()
    config = yaml.safe_load((run / "reward" / "config.yaml").read_text())
    assert config["data"] == str(run / "annotate" / "preferences.jsonl")
    assert [json.loads(line)["step"] for line in (run / "reward" / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)][-1] == 2


def test_guidelines_are_a_file_or_the_text_itself(tmp_path):
    import pytest

    from rlhfkit.annotate.human import guidelines_text
    from rlhfkit.errors import UserError

    (tmp_path / "g.txt").write_text("Rank by helpfulness.\n")
    assert guidelines_text(str(tmp_path / "g.txt")) == "Rank by helpfulness.\n"
    assert guidelines_text("Prefer the kind answer.") == "Prefer the kind answer."
    assert guidelines_text("See rules.md for details") == "See rules.md for details"
    assert guidelines_text(None) == ""
    with pytest.raises(UserError, match=r"rules.md: guidelines file not found"):
        guidelines_text(str(tmp_path / "rules.md"))
    (tmp_path / "bad.md").write_bytes(b"\xff\xfe rules")
    with pytest.raises(UserError, match=r"bad.md: guidelines are not UTF-8 text"):
        guidelines_text(str(tmp_path / "bad.md"))
