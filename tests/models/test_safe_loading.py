"""Safe loading: weights only from safetensors (or torch.load with weights_only=True), no model code run unless
the user passes --trust-remote-code, no YAML tag that builds Python objects; a damaged model folder is one
line and exit status 2, never a traceback or a silently half-random model."""

import ast
import json
import pathlib
import pickle
import shutil
from pathlib import Path

import pytest

from rlhfkit.cli import main
from rlhfkit.config_parsing import build_config
from rlhfkit.errors import ConfigError, UserError
from rlhfkit.models.loading import load_causal_lm, load_tokenizer
from rlhfkit.models.reward_model import load_reward_model

SRC = Path(__file__).parents[2] / "src" / "rlhfkit"
GOOD = {"prompt": "Hi there", "completion": "Hello!", "chosen": "Hello!", "rejected": "Go away."}


# --------------------------------------------------------------------------------------------------
# The source tree: every way of deserialising code is absent or made safe.
# --------------------------------------------------------------------------------------------------
def calls(tree):
    """(call, attribute, owner) for every call: `torch.load(...)` gives ("load", "torch"); `f(...)` (None, None)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Attribute):
                yield node, node.func.attr, ast.unparse(node.func.value)
            else:
                yield node, None, None


def unsafe_loads(root: Path) -> list[str]:
    """Every place under `root` that could deserialise code: pickle-like imports, torch.load without
    weights_only=True, yaml loads without a SafeLoader, trust_remote_code=True written in the code."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        # Assignments by name, to see what a `Loader=loader` variable holds.
        assigned = {t.id: ast.unparse(node.value) for node in ast.walk(tree) if isinstance(node, ast.Assign)
                    for t in node.targets if isinstance(t, ast.Name)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve")
                       for n in names):
                    problems.append(f"{path}:{node.lineno}: imports a pickle-like module")
        for node, attr, owner in calls(tree):
            keywords = {k.arg: k.value for k in node.keywords}
            where = f"{path}:{node.lineno}"
            if owner == "torch" and attr == "load":
                flag = keywords.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            if owner == "yaml" and attr in ("unsafe_load", "unsafe_load_all", "full_load", "full_load_all"):
                problems.append(f"{where}: yaml.{attr}")
            if owner == "yaml" and attr in ("load", "load_all"):
                loader = keywords.get("Loader")
                shown = ast.unparse(loader) if loader is not None else ""
                shown = assigned.get(shown, shown)
                if "SafeLoader" not in shown:
                    problems.append(f"{where}: yaml.{attr} without a SafeLoader")
            value = keywords.get("trust_remote_code")
            if isinstance(value, ast.Constant) and value.value is True:
                problems.append(f"{where}: trust_remote_code=True hard-coded")
    return problems


def test_source_tree_has_no_unsafe_deserialisation():
    assert unsafe_loads(SRC) == []


def test_the_scan_finds_what_it_forbids(tmp_path):
    """The scan is not vacuous: it flags each pattern in a planted file."""
    (tmp_path / "bad.py").write_text("import pickle\nimport torch, yaml\ntorch.load('x')\n"
                                     "yaml.load(s, Loader=yaml.Loader)\nyaml.unsafe_load(s)\nf(trust_remote_code=True)\n")
    text = "\n".join(unsafe_loads(tmp_path))
    for words in ("pickle-like", "weights_only=True", "without a SafeLoader", "yaml.unsafe_load", "hard-coded"):
        assert words in text


# --------------------------------------------------------------------------------------------------
# Damaged model folders
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory, tokenizer):
    """A tiny model and its tokenizer saved with save_pretrained (safetensors), to copy and damage."""
    from rlhfkit.models.tiny import build_tiny_model

    folder = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny_model(tokenizer, seed=0).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture()
def model_copy(saved_tiny, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(saved_tiny, folder)
    return folder


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


class _Payload:
    """Unpickling this writes the marker file: proof that a loader unpickled it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.write_text, (pathlib.Path(self.marker), "unpickled"))


def pickle_only(folder: Path, marker: Path) -> None:
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"payload": _Payload(str(marker))}))


def remote_code(folder: Path, marker: Path, file: str = "config.json") -> None:
    """auto_map pointing at custom.py, whose import writes the marker."""
    data = json.loads((folder / file).read_text())
    key = "AutoConfig" if file == "config.json" else "AutoTokenizer"
    data["auto_map"] = {key: "custom.CustomThing", "AutoModelForCausalLM": "custom.CustomModel"}
    (folder / file).write_text(json.dumps(data))
    (folder / "custom.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('imported')\n")


DAMAGES = {
    "no_weights": (lambda d, m: (d / "model.safetensors").unlink(), "no *.safetensors weights"),
    "pickle_only": (pickle_only, "only pickled weights (pytorch_model.bin), which rlhfkit never loads"),
    "remote_code": (remote_code, "config.json: asks to run Python code from the model folder (auto_map: "
                                 "custom.CustomThing); rlhfkit runs none unless you pass --trust-remote-code"),
    "remote_tokenizer": (lambda d, m: remote_code(d, m, "tokenizer_config.json"),
                         "tokenizer_config.json: asks to run Python code"),
    "shapes": (lambda d, m: edit_config(d, hidden_size=32, intermediate_size=64),
               "the weights do not match config.json: 'model.embed_tokens.weight' has shape [49152, 64] in the "
               "safetensors file but config.json implies [49152, 32]"),
    "more_layers": (lambda d, m: edit_config(d, num_hidden_layers=4),
                    "the safetensors files lack 18 weight(s) that config.json's architecture needs "
                    "(first: 'model.layers.2."),
    "bad_config_json": (lambda d, m: (d / "config.json").write_text("{not json"), "config.json:1: invalid JSON"),
    "corrupt_safetensors": (lambda d, m: (d / "model.safetensors").write_bytes(b"\0" * 16),
                            "cannot load the model: Error while deserializing header"),
    "no_tokenizer": (lambda d, m: [p.unlink() for p in d.glob("tokenizer*")], "no tokenizer in this model folder"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_folder_is_one_line_exit_2_and_writes_nothing(damage, model_copy, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    apply, words = DAMAGES[damage]
    marker = tmp_path / "MARKER"
    apply(model_copy, marker)
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps(GOOD) + "\n")
    out = tmp_path / "out"
    code = main(["sft", "--preset", "tiny", "--model", str(model_copy), "--data", str(data), "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"rlhfkit sft: error: {model_copy}"), err
    assert words in err, err
    assert not out.exists()
    assert not marker.exists()  # nothing was unpickled or imported


# Where each command reads a model folder (besides --model), with flags that get it there.
MODEL_FLAGS = {
    "annotate": ["--model"],
    "reward": ["--model"],
    "dpo": ["--model", "--ref-model"],
    "ppo": ["--model", "--reward-model", "--ref-model"],
    "eval": ["--model", "--ref-model", "--reward-model"],
}
MODEL_CASES = [(command, flag) for command, flags in MODEL_FLAGS.items() for flag in flags]


@pytest.mark.parametrize("command, flag", MODEL_CASES, ids=[f"{c}{f}" for c, f in MODEL_CASES])
def test_pickle_only_folder_is_refused_by_every_command(command, flag, model_copy, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    pickle_only(model_copy, marker)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(dict(GOOD, prompt=f"Hi {i}")) + "\n" for i in range(8)))
    args = {"--model": "tiny", "--data": str(data), "--output-dir": str(tmp_path / "out")}
    if command == "ppo":
        args["--reward-model"] = "tiny"
    args[flag] = str(model_copy)
    code = main([command, "--preset", "tiny", *[x for pair in args.items() for x in pair]])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"{model_copy}: only pickled weights (pytorch_model.bin)" in err
    assert not (tmp_path / "out").exists()
    assert not marker.exists()


def test_loaders_refuse_remote_code_without_the_flag(model_copy, tmp_path):
    marker = tmp_path / "MARKER"
    remote_code(model_copy, marker)
    for load in (load_tokenizer, load_causal_lm, lambda p: load_reward_model(p, 0)):
        with pytest.raises(UserError, match="--trust-remote-code"):
            load(model_copy)
    assert not marker.exists()


def test_shape_mismatch_is_refused_for_a_reward_model_too(model_copy):
    edit_config(model_copy, hidden_size=32, intermediate_size=64)
    with pytest.raises(UserError, match="do not match config.json"):
        load_reward_model(model_copy, 0)


def test_an_intact_folder_still_loads(model_copy):
    """The checks refuse only what is wrong: a causal LM folder loads as a policy and as a fresh reward model
    (whose missing 'score' head is expected)."""
    assert load_causal_lm(model_copy).config.hidden_size == 64
    assert hasattr(load_reward_model(model_copy, 0), "score")


def test_yaml_python_tag_is_refused_and_never_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text('seed: !!python/object/apply:os.system ["touch MARKER"]\n'
                      'model: !!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path ["MARKER2"]]\n')
    with pytest.raises(ConfigError, match=r"c.yaml:1: invalid YAML: the tag '!!python/object/apply:os.system' "
                                          r"is not allowed"):
        build_config("sft", str(config))
    assert not (tmp_path / "MARKER").exists() and not (tmp_path / "MARKER2").exists()
