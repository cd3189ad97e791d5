"""`report_to` as a setting: a list in YAML, comma-separated on the command line, checked with file:line messages;
a tracker whose package is missing stops the command with one line naming the extra, before anything runs."""

import importlib.util

import pytest

from rlhfkit.cli import main
from rlhfkit.config_parsing import build_config
from rlhfkit.errors import ConfigError
from rlhfkit.pipeline import load_pipeline, stage_config
from rlhfkit.track import registry


def test_a_list_in_yaml_and_comma_separated_text_on_the_command_line(tmp_path):
    config = tmp_path / "sft.yaml"
    config.write_text("max_steps: 2\nreport_to: [tensorboard]\n")
    assert build_config("sft", str(config)).report_to == ["tensorboard"]
    assert build_config("sft", str(config), overrides={"report_to": "tensorboard, tensorboard"}).report_to == \
        ["tensorboard"]
    assert build_config("sft", str(config), overrides={"report_to": "none"}).report_to == []
    assert build_config("eval").report_to == []  # the default: no tracker
    config.write_text("max_steps: 2\nreport_to: [tensorboard, comet]\n")
    with pytest.raises(ConfigError, match=r"sft.yaml:2: key 'report_to': 'comet' is not one of tensorboard, mlflow, "
                                          r"wandb, trackio"):
        build_config("sft", str(config))
    config.write_text("report_to: {tensorboard: 1}\n")
    with pytest.raises(ConfigError, match=r"sft.yaml:1: key 'report_to': expected a list of names"):
        build_config("sft", str(config))


def test_a_pipeline_passes_its_trackers_to_every_stage_unless_a_section_says_otherwise(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("output_dir: x\nmodel: tiny\nreport_to: [tensorboard]\nstages: [sft, eval]\n"
                    "eval: {report_to: []}\n")
    pipe = load_pipeline(path)
    assert pipe.report_to == ["tensorboard"]
    assert stage_config(pipe, "sft", {}).report_to == ["tensorboard"]
    assert stage_config(pipe, "eval", {}).report_to == []
    assert load_pipeline(path, {"report_to": "none"}).report_to == []  # `rlhfkit pipeline FILE --report-to none`
    path.write_text("output_dir: x\nreport_to: tensorbored\n")
    with pytest.raises(ConfigError, match=r"p.yaml:2: key 'report_to': 'tensorbored' is not one of"):
        load_pipeline(path)


@pytest.fixture()
def without_wandb(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(registry.importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else
                        real(name, *a))


def test_a_missing_tracker_package_is_one_line_naming_the_extra_before_anything_runs(tmp_path, capsys,
                                                                                       without_wandb):
    out = tmp_path / "sft"
    assert main(["sft", "--preset", "tiny", "--report-to", "tensorboard,wandb", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("rlhfkit sft: error: report_to: wandb needs the 'wandb' package, which is not installed: "
                   "pip install \"rlhfkit[wandb]\"")
    assert not out.exists()
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"output_dir: {tmp_path / 'demo'}\nmodel: tiny\nstages: [sft]\nreport_to: [wandb]\n")
    assert main(["pipeline", str(pipeline)]) == 2
    assert "pip install \"rlhfkit[wandb]\"" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
