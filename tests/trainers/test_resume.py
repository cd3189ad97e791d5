"""An interrupted run continued with --resume ends exactly where an uninterrupted one does."""

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.runtime.metrics_log import MetricsLog, read_metrics
from rlhfkit.trainers.dpo import run_dpo
from rlhfkit.trainers.reward import run_reward
from rlhfkit.trainers.sft import run_sft

from .helpers import keyword_pairs, tiny_config, write_jsonl


class Crash(Exception):
    pass


def crash_after_logging(monkeypatch, step):
    """Make the run die right after it logs `step` (before that step's checkpoint, if any, is written)."""
    real_write = MetricsLog.write

    def write(self, row):
        real_write(self, row)
        if row["step"] == step:
            raise Crash(step)

    monkeypatch.setattr(MetricsLog, "write", write)


def comparable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))} for r in rows]


def assert_crash_and_resume_is_exact(tmp_path, monkeypatch, run, config, crash_step: int,
                                     files=("model.safetensors",)) -> list[dict]:
    """Run `config(output_dir, resume)` straight through, and again crashing right after it logs `crash_step` and
    then resuming; assert that every file of `files` holds the same tensors bit for bit and that the metrics rows
    agree (timings aside). Returns the resumed run's rows.

    The global RNG is put in a different state before each run: a stage must seed everything it draws (a head, an
    adapter's init), not inherit whatever the process drew before (in a test suite, the previous test's draws)."""
    torch.manual_seed(101)
    run(config(tmp_path / "straight", False))
    with monkeypatch.context() as patch:
        crash_after_logging(patch, crash_step)
        torch.manual_seed(202)
        with pytest.raises(Crash):
            run(config(tmp_path / "crashed", False))
    torch.manual_seed(303)
    run(config(tmp_path / "crashed", True))
    for part in files:
        straight, resumed = load_file(tmp_path / "straight" / part), load_file(tmp_path / "crashed" / part)
        assert straight.keys() == resumed.keys(), part
        for key in straight:
            assert torch.equal(straight[key], resumed[key]), (part, key)
    a, b = read_metrics(tmp_path / "straight" / "metrics.jsonl"), read_metrics(tmp_path / "crashed" / "metrics.jsonl")
    assert comparable(a) == comparable(b)
    return b


STAGES = {
    "sft": (run_sft, lambda tmp: write_jsonl(tmp / "d.jsonl", [{"prompt": f"Q{i}", "completion": f"A {i % 7}"}
                                                                for i in range(20)])),
    "reward": (run_reward, lambda tmp: write_jsonl(tmp / "d.jsonl", keyword_pairs(40, seed=5))),
    "dpo": (run_dpo, lambda tmp: write_jsonl(tmp / "d.jsonl", keyword_pairs(40, seed=5))),
}


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo"])
@pytest.mark.parametrize("crash_step", [4, 5])
def test_resume_after_a_crash_is_exact(tmp_path, monkeypatch, stage, crash_step):
    run, make_data = STAGES[stage]
    data = make_data(tmp_path)
    common = dict(data=data, max_steps=8, save_every=2, eval_every=3, batch_size=4, progress=False,
                  gradient_accumulation_steps=2, warmup_ratio=0.25, keep_last_n=0)
    # 20 examples / batch 4 / accumulation 2: step 3 ends mid-epoch 2, so resume restarts inside an epoch.
    rows = assert_crash_and_resume_is_exact(
        tmp_path, monkeypatch, run, lambda out, resume: tiny_config(stage, output_dir=out, resume=resume, **common),
        crash_step)
    assert [r["step"] for r in rows] == list(range(1, 9))


def test_resume_without_checkpoints_starts_fresh_and_refuses_to_mix_runs(tmp_path):
    from rlhfkit.errors import UserError

    data = STAGES["sft"][1](tmp_path)
    config = tiny_config("sft", data=data, output_dir=tmp_path / "r", max_steps=2, progress=False, resume=True)
    run_sft(config)
    assert len(read_metrics(tmp_path / "r" / "metrics.jsonl")) == 2
    with pytest.raises(UserError, match="already holds checkpoints"):
        run_sft(tiny_config("sft", data=data, output_dir=tmp_path / "r", max_steps=2, progress=False))


def test_checkpoints_carry_a_manifest_of_sizes_and_checksums(tmp_path):
    import hashlib
    import json

    data = STAGES["sft"][1](tmp_path)
    run_sft(tiny_config("sft", data=data, output_dir=tmp_path / "r", max_steps=2, save_every=2, progress=False))
    folder = tmp_path / "r" / "checkpoints" / "step-2"
    files = json.loads((folder / "manifest.json").read_text())["files"]
    on_disk = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert sorted(files) == on_disk and "model/model.safetensors" in files and "optimizer.pt" in files
    for name, entry in files.items():
        content = (folder / name).read_bytes()
        assert entry == {"bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()}


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_resume_skips_a_damaged_checkpoint_and_stays_exact(tmp_path, monkeypatch, capsys, damage):
    """The newest checkpoint is damaged after the crash: resume reports it, continues from the one before,
    and still ends bit-for-bit where the uninterrupted run does."""
    data = STAGES["sft"][1](tmp_path)
    common = dict(data=data, max_steps=8, save_every=2, batch_size=4, progress=False, keep_last_n=0)
    run_sft(tiny_config("sft", output_dir=tmp_path / "straight", **common))
    with monkeypatch.context() as patch:
        crash_after_logging(patch, 5)
        with pytest.raises(Crash):
            run_sft(tiny_config("sft", output_dir=tmp_path / "crashed", **common))
    weights = tmp_path / "crashed" / "checkpoints" / "step-4" / "model" / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "flip":
        content = bytearray(weights.read_bytes())
        content[len(content) // 2] ^= 0xFF
        weights.write_bytes(bytes(content))
    else:
        (weights.parent.parent / "optimizer.pt").unlink()
    capsys.readouterr()
    run_sft(tiny_config("sft", output_dir=tmp_path / "crashed", resume=True, **common))
    out = capsys.readouterr().out
    assert "skipping damaged checkpoint" in out and "step-4" in out and "resuming from" in out and "step-2" in out
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "crashed" / "model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    a, b = read_metrics(tmp_path / "straight" / "metrics.jsonl"), read_metrics(tmp_path / "crashed" / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 9)) and comparable(a) == comparable(b)


def test_resume_with_only_damaged_checkpoints_is_a_clear_error(tmp_path):
    from rlhfkit.errors import UserError

    data = STAGES["sft"][1](tmp_path)
    run_sft(tiny_config("sft", data=data, output_dir=tmp_path / "r", max_steps=2, save_every=2, progress=False))
    (tmp_path / "r" / "checkpoints" / "step-2" / "scheduler.pt").write_bytes(b"")
    with pytest.raises(UserError, match=r"no intact checkpoint to resume from: .*step-2 \(scheduler.pt has 0 bytes"):
        run_sft(tiny_config("sft", data=data, output_dir=tmp_path / "r", max_steps=4, progress=False, resume=True))


def signal_after_logging(monkeypatch, step, signum):
    """Deliver `signum` to this process right after the run logs `step`, as a `kill` or Ctrl-C would."""
    import os

    real_write = MetricsLog.write

    def write(self, row):
        real_write(self, row)
        if row["step"] == step:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(MetricsLog, "write", write)


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_signal_writes_a_checkpoint_stops_cleanly_and_resume_is_exact(tmp_path, monkeypatch, capsys, signame):
    import signal

    from rlhfkit.cli import main

    signum = getattr(signal, signame)
    data = STAGES["sft"][1](tmp_path)
    # fp32 on both sides: the command line's tiny preset would resolve 'auto' to bf16 on a CPU with native bf16,
    # while tiny_config runs fp32 (the straight run)
    common = dict(data=data, max_steps=6, save_every=4, batch_size=4, progress=False, keep_last_n=0,
                  mixed_precision="no")
    run_sft(tiny_config("sft", output_dir=tmp_path / "straight", **common))
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    argv = ["sft", "--preset", "tiny"] + [f"--{k.replace('_', '-')}={v}" for k, v in common.items()]
    with monkeypatch.context() as patch:
        signal_after_logging(patch, 3, signum)  # step 3: no checkpoint is due (save_every 4)
        assert main(argv + [f"--output-dir={tmp_path / 'stopped'}"]) == 128 + signum
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # handlers restored
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rlhfkit")]
    assert len(err) == 1 and f"stopped by {signame} after step 3" in err[0] and "--resume" in err[0], err
    assert [p.name for p in (tmp_path / "stopped" / "checkpoints").iterdir()] == ["step-3"]
    assert not (tmp_path / "stopped" / "model.safetensors").exists()  # the final model is not written
    assert main(argv + [f"--output-dir={tmp_path / 'stopped'}", "--resume=true"]) == 0
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "stopped" / "model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    a, b = read_metrics(tmp_path / "straight" / "metrics.jsonl"), read_metrics(tmp_path / "stopped" / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 7)) and comparable(a) == comparable(b)
