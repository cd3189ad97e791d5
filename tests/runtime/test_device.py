"""The `device` setting: its spelling, what 'auto' picks, clear errors for a device this machine lacks, and the
helpers that put batches and find models. CUDA's presence is simulated where a test needs it (no tensor is
allocated on it); on a real GPU, bench/gpu_check.sh runs the stages there."""

import pytest
import torch
import yaml

from rlhfkit.cli import main
from rlhfkit.errors import ConfigError
from rlhfkit.runtime import device as device_module
from rlhfkit.runtime.device import choose_device, module_device, parse_device, resolve_device, to_device


@pytest.fixture
def fake_cuda(monkeypatch):
    """Make torch report `count` CUDA GPUs named 'Tesla T4' (only the queries choose_device makes)."""

    def install(count: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Tesla T4")
        monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)

    return install


@pytest.mark.parametrize("name, parsed", [("auto", ("auto", None)), ("cpu", ("cpu", None)), ("CUDA", ("cuda", None)),
                                          ("cuda:3", ("cuda", 3)), (" mps ", ("mps", None))])
def test_device_names_parse(name, parsed):
    assert parse_device(name) == parsed


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "cpu:1", "mps:0", "", "cuda:0:1"])
def test_a_misspelt_device_names_the_key_and_the_choices(name):
    with pytest.raises(ConfigError) as info:
        parse_device(name)
    assert str(info.value) == f"key 'device': {name!r} is not a device (choose from auto, cpu, cuda, cuda:N, mps)"


def test_auto_is_the_first_gpu_when_there_is_one_else_the_cpu(fake_cuda):
    fake_cuda(0)
    assert choose_device("auto") == (torch.device("cpu"), "'auto' chose the CPU: torch sees no CUDA GPU")
    fake_cuda(2)
    assert choose_device("auto") == (torch.device("cuda", 0), "'auto' chose cuda:0 (Tesla T4)")
    assert choose_device("cuda:1") == (torch.device("cuda", 1), "device is 'cuda:1' (Tesla T4)")
    assert choose_device("cuda")[0] == torch.device("cuda", 0)
    assert choose_device("cpu")[0] == torch.device("cpu")  # asked for: the CPU even with GPUs present


def test_a_missing_gpu_is_one_clear_error(fake_cuda, monkeypatch):
    fake_cuda(2)
    with pytest.raises(ConfigError, match=r"^key 'device': 'cuda:2' was asked for, but torch sees 2 CUDA devices "
                                          r"\(cuda:0\.\.cuda:1\)$"):
        choose_device("cuda:2")
    fake_cuda(1)
    with pytest.raises(ConfigError, match=r"torch sees 1 CUDA device \(cuda:0\)$"):
        choose_device("cuda:1")
    fake_cuda(0)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(ConfigError, match=r"^key 'device': 'cuda' was asked for, but this torch was built without "
                                          r"CUDA; use 'cpu' or 'auto'$"):
        choose_device("cuda")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    with pytest.raises(ConfigError, match="but torch sees no CUDA GPU; use 'cpu' or 'auto'$"):
        choose_device("cuda:0")


def test_resolve_records_the_device_and_prints_one_line(fake_cuda, capsys):
    class Config:
        device = "auto"

    fake_cuda(1)
    config = Config()
    assert resolve_device(config) == torch.device("cuda", 0)
    assert config.device == "cuda:0"  # what config.yaml will record
    assert capsys.readouterr().out == "device: cuda:0: 'auto' chose cuda:0 (Tesla T4)\n"


def test_a_stage_run_on_a_missing_gpu_exits_2_before_writing_anything(tmp_path, capsys, fake_cuda):
    fake_cuda(0)
    out = tmp_path / "sft"
    code = main(["sft", "--preset", "tiny", "--device", "cuda", "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [f"rlhfkit sft: error: key 'device': 'cuda' was asked for, but "
                                        f"{'this torch was built without CUDA' if torch.version.cuda is None else 'torch sees no CUDA GPU'}"
                                        f"; use 'cpu' or 'auto'"]
    assert not out.exists()


def test_a_misspelt_device_in_a_pipeline_file_names_its_line(tmp_path, capsys):
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"output_dir: {tmp_path / 'run'}\nmodel: tiny\nstages: [sft]\nsft:\n  max_steps: 1\n"
                        f"  device: gpu0\n")
    assert main(["pipeline", str(pipeline)]) == 2
    err = capsys.readouterr().err.strip()
    assert "key 'device': 'gpu0' is not a device" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_the_cpu_is_recorded_in_config_yaml_of_a_cpu_run(tmp_path, fake_cuda):
    from rlhfkit.trainers.sft import run_sft

    from ..trainers.helpers import tiny_config

    fake_cuda(0)
    run_sft(tiny_config("sft", output_dir=tmp_path / "sft", max_steps=1, save_every=0, eval_every=0, progress=False))
    assert yaml.safe_load((tmp_path / "sft" / "config.yaml").read_text())["device"] == "cpu"


def test_to_device_moves_tensors_and_keeps_the_rest():
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "names": ["a", "b"], "n": 2}
    moved = to_device(batch, "cpu")
    assert moved["input_ids"].device.type == "cpu" and moved["names"] == ["a", "b"] and moved["n"] == 2
    assert torch.equal(moved["input_ids"], batch["input_ids"])


def test_module_device_of_a_reference_role_without_parameters_of_its_own():
    from rlhfkit.models.loading import load_causal_lm
    from rlhfkit.models.roles import Role

    base = load_causal_lm("tiny")
    reference = Role(base, None)  # the base with adapters off: it owns no parameter
    assert list(reference.parameters()) == []
    assert module_device(reference) == base.get_input_embeddings().weight.device == torch.device("cpu")
    assert module_device(torch.nn.Module()) == torch.device("cpu")
    assert device_module.stage_device(object()) == torch.device("cpu")


@pytest.mark.parametrize("gpus, requested, device, backend", [(2, "auto", "cuda:1", "nccl"), (2, "cuda", "cuda:1", "nccl"),
                                                              (0, "auto", "cpu", "gloo"), (2, "cpu", "cpu", "gloo")])
def test_under_a_launcher_each_process_takes_its_local_gpu_and_nccl(fake_cuda, monkeypatch, capsys, gpus, requested,
                                                                     device, backend):
    """Process 1 of 2 (torchrun's environment): CUDA means the GPU of its LOCAL_RANK and the NCCL backend; the CPU
    means gloo. The process group is joined once, with the timeout that stops a job whose peer died."""
    fake_cuda(gpus)
    monkeypatch.setenv("RANK", "1"), monkeypatch.setenv("WORLD_SIZE", "2"), monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RLHFKIT_DIST_TIMEOUT_S", "42")
    joined = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: bool(joined))
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda name, timeout: joined.append((name, timeout)))
    config = type("Config", (), {"device": requested})()
    assert resolve_device(config) == torch.device(device) and config.device == device
    assert [(name, timeout.total_seconds()) for name, timeout in joined] == [(backend, 42.0)]
    assert capsys.readouterr().out.startswith(f"device: {device}: ")


def test_under_a_launcher_one_fixed_gpu_for_every_process_is_refused(fake_cuda, monkeypatch):
    fake_cuda(2)
    monkeypatch.setenv("RANK", "0"), monkeypatch.setenv("WORLD_SIZE", "2"), monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ConfigError, match="'cuda:0' would put all 2 processes on one GPU"):
        resolve_device(type("Config", (), {"device": "cuda:0"})())
