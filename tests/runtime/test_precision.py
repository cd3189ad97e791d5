"""mixed_precision 'auto': bf16 only where the hardware runs it natively, fp32 otherwise; decided with the
hardware probes faked both ways, and recorded by every stage in config.yaml."""

import warnings

import pytest
import torch
import yaml

from rlhfkit.runtime import precision
from rlhfkit.runtime.precision import autocast, choose_precision, cpu_has_native_bf16, resolve_precision


@pytest.fixture()
def cpu_bf16(monkeypatch):
    """Set whether the (faked) CPU runs bf16 natively; resets the once-per-process warning."""
    monkeypatch.setattr(precision, "_warned_emulated", set())

    def fake(native: bool):
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)

    return fake


def test_auto_picks_bf16_on_a_cpu_with_native_bf16(cpu_bf16):
    cpu_bf16(True)
    choice = choose_precision("auto")
    assert choice.mode == "bf16"
    assert "native bf16" in choice.reason and "AVX512-BF16/AMX" in choice.reason


def test_auto_picks_fp32_on_a_cpu_without_native_bf16(cpu_bf16):
    cpu_bf16(False)
    choice = choose_precision("auto")
    assert choice.mode == "no"
    assert choice.reason.startswith("'auto' chose fp32: this CPU has no native bf16")
    assert choice.describe().startswith("precision: fp32: ")


def test_explicit_bf16_on_an_emulating_cpu_runs_and_warns_once(cpu_bf16):
    cpu_bf16(False)
    with pytest.warns(RuntimeWarning, match="emulated there and runs far slower"):
        assert choose_precision("bf16").mode == "bf16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second stage in the same process: no second warning
        assert choose_precision("bf16").mode == "bf16"


def test_explicit_choices_are_kept_and_native_bf16_does_not_warn(cpu_bf16):
    cpu_bf16(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose_precision("bf16").mode == "bf16"
        assert choose_precision("no").mode == "no"
    cpu_bf16(False)
    assert choose_precision("no").mode == "no"


def test_cuda_uses_the_gpu_probe(monkeypatch, cpu_bf16):
    cpu_bf16(False)
    monkeypatch.setattr(precision, "cuda_has_native_bf16", lambda: True)
    assert choose_precision("auto", "cuda").mode == "bf16"
    assert choose_precision("auto", "cpu").mode == "no"
    monkeypatch.setattr(precision, "cuda_has_native_bf16", lambda: False)  # T4, V100: fp16 with a loss scaler
    choice = choose_precision("auto", "cuda")
    assert choice.mode == "fp16" and "this GPU has no native bf16" in choice.reason
    assert "dynamic loss scaler" in choice.describe()
    assert choose_precision("auto", "cpu").mode == "no"  # the CPU never gets fp16 unasked
    assert choose_precision("fp16", "cpu").mode == "fp16"


def test_the_cpu_probe_is_onednns_own_check():
    assert cpu_has_native_bf16() == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def test_unknown_modes_are_refused():
    with pytest.raises(ValueError, match="auto, no, bf16, fp16"):
        choose_precision("fp8")
    with pytest.raises(ValueError, match="resolve 'auto' first"):
        autocast("auto")


def test_resolve_precision_rewrites_the_config_and_prints_one_line(cpu_bf16, capsys):
    from rlhfkit.config import SFTConfig

    config = SFTConfig()
    assert config.mixed_precision == "auto"  # the default of every stage
    cpu_bf16(False)
    resolve_precision(config)
    assert config.mixed_precision == "no"
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("precision: fp32: 'auto' chose fp32")
    resolve_precision(config)  # idempotent: a resolved config stays resolved
    assert config.mixed_precision == "no"


@pytest.mark.parametrize("native", [False, True])
def test_a_stage_records_the_resolved_precision_in_config_yaml(tmp_path, cpu_bf16, capsys, native, monkeypatch):
    from rlhfkit.annotate.stage import run_annotate

    from ..trainers.helpers import tiny_config, write_jsonl

    cpu_bf16(native)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # 'auto' on a machine without a GPU
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Tell me about topic {i}"} for i in range(2)])
    config = tiny_config("annotate", data=prompts, output_dir=tmp_path / "ann", responses_per_prompt=2,
                         max_new_tokens=4, progress=False, mixed_precision="auto")
    run_annotate(config)
    written = yaml.safe_load((tmp_path / "ann" / "config.yaml").read_text())
    assert written["mixed_precision"] == ("bf16" if native else "no")
    assert written["device"] == "cpu"  # 'auto' resolved, on a machine without a GPU
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "device: cpu: 'auto' chose the CPU: torch sees no CUDA GPU"
    assert ("precision: bf16 autocast" if native else "precision: fp32") in lines[1]


def test_every_stage_and_preset_defaults_to_auto():
    from rlhfkit.config import STAGES
    from rlhfkit.pipeline import Pipeline, load_pipeline, demo_path

    assert all(cls().mixed_precision == "auto" for cls in STAGES.values())
    assert Pipeline(output_dir="x").mixed_precision == "auto"
    for preset in (None, "tiny"):
        assert load_pipeline(demo_path(preset), {}).mixed_precision == "auto"


def test_a_pipeline_file_with_an_unknown_precision_is_refused(tmp_path):
    from rlhfkit.errors import ConfigError
    from rlhfkit.pipeline import load_pipeline

    path = tmp_path / "pipe.yaml"
    path.write_text("output_dir: out\nmodel: tiny\nmixed_precision: fp8\nstages: [sft]\n")
    with pytest.raises(ConfigError, match=r"pipe.yaml:3: key 'mixed_precision': 'fp8' is not one of auto, no, bf16, fp16"):
        load_pipeline(path)


needs_native_bf16 = pytest.mark.skipif(
    not cpu_has_native_bf16(),
    reason="this CPU has no native bf16 (no AVX512-BF16/AMX, per oneDNN): bf16 would be emulated, ~100x slower")


@needs_native_bf16
def test_on_a_cpu_with_native_bf16_auto_runs_bf16_close_to_fp32(tiny_model, tokenizer):
    """The real probe (not faked): 'auto' picks bf16 here, and the tiny model's logits under bf16 autocast agree
    with fp32 to bf16's precision (8 bits of mantissa, through two layers of hidden size 64)."""
    assert choose_precision("auto").mode == "bf16"
    ids = torch.tensor([tokenizer("The weather is lovely today")["input_ids"]])
    with torch.no_grad():
        full = tiny_model(input_ids=ids).logits
        with autocast("bf16"):
            half = tiny_model(input_ids=ids).logits.float()
    scale = float(full.abs().max())
    assert float((half - full).abs().max()) <= 2 ** -8 * 16 * max(scale, 1.0)
    assert not torch.equal(half, full)  # it really ran in bf16


def test_the_loss_scaler_skips_an_overflow_halves_its_scale_and_passes_through_otherwise():
    from rlhfkit.runtime.precision import LossScaler

    weight = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scaler = LossScaler("fp16")
    assert scaler.active and scaler.scale == 65536.0
    scaler.backward((weight * torch.tensor([1e-6, 2e-6])).sum())
    assert weight.grad.tolist() == pytest.approx([65536e-6, 131072e-6])  # scaled: fp16 would keep these
    scaler.unscale(optimizer)
    assert weight.grad.tolist() == pytest.approx([1e-6, 2e-6])  # true-sized before clipping and the step
    assert not scaler.overflowed(float(weight.grad.norm()))
    scaler.step(optimizer)
    scaler.update()
    assert weight.tolist() == pytest.approx([1.0 - 1e-7, 2.0 - 2e-7])
    optimizer.zero_grad()
    scaler.backward((weight * float("inf")).sum())  # an overflow: no step, the scale halves
    scaler.unscale(optimizer)
    assert scaler.overflowed(float(weight.grad.norm()))
    scaler.update()
    assert scaler.scale == 32768.0
    state = scaler.state_dict()
    again = LossScaler("fp16")
    again.load_state_dict(state)
    assert again.scale == 32768.0
    plain = LossScaler("no")  # fp32 and bf16: nothing is scaled
    optimizer.zero_grad()
    plain.backward((weight * 3.0).sum())
    plain.unscale(optimizer)
    assert weight.grad.tolist() == [3.0, 3.0] and not plain.overflowed(float("inf")) and plain.scale == 1.0
