"""A run killed with SIGKILL at any moment and continued with `--resume` ends exactly where an uninterrupted
run ends: bit-identical weights (CPU) and the same metrics.jsonl rows, each step once.

Runs are real `rlhfkit.cli.main` processes, forked from a zygote that imported torch and transformers once
(tests/trainers/kill_at.py), and are killed either by the test after a seeded random delay drawn from the
measured length of an uninterrupted run, or by themselves at an exact point (inside a checkpoint write,
while old checkpoints are pruned, while metrics.jsonl is appended or rewritten).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.runtime.checkpoint import checkpoint_problem, list_checkpoints
from rlhfkit.runtime.metrics_log import MetricsLog, read_metrics

from .helpers import keyword_pairs, save_random_reward_model, write_jsonl
from .zygote import Zygote

pytestmark = pytest.mark.slow

RUN_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("zygote") / "runs.log", timeout=RUN_TIMEOUT_S)
    yield z
    z.close()


def flags(**options) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]


def comparable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))} for r in rows]


def assert_same_run(reference: Path, resumed: Path, models=("model.safetensors",), logs=("metrics.jsonl",)):
    for name in models:
        a, b = load_file(reference / name), load_file(resumed / name)
        assert a.keys() == b.keys()
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, f"{name}: tensors differ from the uninterrupted run: {different[:5]}"
    for name in logs:
        a, b = read_metrics(reference / name), read_metrics(resumed / name)
        assert [r["step"] for r in b] == [r["step"] for r in a], f"{name}: steps differ"
        assert comparable(b) == comparable(a), f"{name}: rows differ"
    # No checkpoint is left damaged under a checkpoint's name, and no leftover of an interrupted write.
    leftovers = sorted(p.name for p in (resumed / "checkpoints").iterdir() if not p.name.startswith("step-"))
    assert not leftovers, leftovers
    for step, path in list_checkpoints(resumed):
        assert checkpoint_problem(path) is None, path
    assert list_checkpoints(resumed)[-1][0] == list_checkpoints(reference)[-1][0]


def state_of(out: Path) -> str:
    """Where a killed run stopped: its checkpoint folders, metrics rows (and a torn one), the final model."""
    root = out / "checkpoints"
    folders = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    rows, torn = 0, False
    if (out / "metrics.jsonl").exists():
        text = (out / "metrics.jsonl").read_text()
        rows, torn = len(read_metrics(out / "metrics.jsonl")), bool(text) and not text.endswith("\n")
    final = (out / "model.safetensors").exists()
    return f"checkpoints {folders}, {rows} metrics rows{' + a torn one' if torn else ''}, final model: {final}"


def assert_no_damaged_checkpoint(out: Path):
    """Whatever moment a kill hit, every `step-N` folder is a complete checkpoint (or absent)."""
    for _, path in list_checkpoints(out):
        assert checkpoint_problem(path) is None, f"{path}: {checkpoint_problem(path)}"
    root = out / "checkpoints"
    for folder in root.iterdir() if root.is_dir() else ():
        if folder.name.startswith("step-"):
            assert (folder / "trainer_state.json").is_file(), f"{folder}: half-deleted checkpoint"


# --- the stages' data and configs: tiny, a few steps, a checkpoint every step or two --------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    sft = [{"prompt": f"Question {i}?", "completion": f"Answer {i % 5}."} for i in range(16)]
    write_jsonl(folder / "sft.jsonl", sft[:12])
    write_jsonl(folder / "sft_eval.jsonl", sft[12:])
    pairs = keyword_pairs(20, seed=3)
    write_jsonl(folder / "pairs.jsonl", pairs[:16])
    write_jsonl(folder / "pairs_eval.jsonl", pairs[16:])
    write_jsonl(folder / "prompts.jsonl", [{"prompt": f"Say something about item {i}"} for i in range(8)])
    return folder


@pytest.fixture(scope="module")
def reward_folder(tmp_path_factory):
    """A tiny reward model with a random head, for PPO."""
    return save_random_reward_model(tmp_path_factory.mktemp("rm"))


def stage_argv(stage: str, data: Path, reward_folder: Path | None = None) -> list[str]:
    common = dict(progress="false", seed=7, log_every=1)
    if stage == "sft":
        # 12 examples, batch 4: an epoch ends after step 3 and after step 6; checkpoints at 2, 4, 6, 8, the
        # last two kept.
        options = dict(data=data / "sft.jsonl", eval_data=data / "sft_eval.jsonl", max_steps=8, batch_size=4,
                       save_every=2, keep_last_n=2, eval_every=3, warmup_ratio=0.25, lr_scheduler="cosine")
    elif stage in ("reward", "dpo"):
        # 16 pairs, batch 4: an epoch every 4 steps; a checkpoint every step, the last two kept.
        options = dict(data=data / "pairs.jsonl", eval_data=data / "pairs_eval.jsonl", max_steps=6, batch_size=4,
                       save_every=1, keep_last_n=2, eval_every=3, warmup_ratio=0.25, lr_scheduler="cosine")
    elif stage in ("grpo", "rloo"):
        # 8 prompts, 2 per rollout x 4 completions: an epoch every 4 iterations; two passes of two mini-batches
        # per rollout (ratios away from 1) and a reference (beta > 0), so the optimizer state matters.
        options = dict(data=data / "prompts.jsonl", reward_model=reward_folder, max_steps=5, prompts_per_step=2,
                       num_generations=4, mini_batch_size=4, gradient_accumulation_steps=2, num_iterations=2,
                       max_new_tokens=6, beta=0.04, save_every=1, keep_last_n=2, sample_every=1)
    else:
        # 8 prompts, 4 per rollout: an epoch every 2 iterations; adaptive KL so that its state must resume.
        options = dict(data=data / "prompts.jsonl", reward_model=reward_folder, max_steps=4, rollout_batch_size=4,
                       mini_batch_size=2, ppo_epochs=2, max_new_tokens=6, save_every=1, keep_last_n=2,
                       sample_every=1, adaptive_kl="true", kl_target=0.1, kl_horizon=100)
    return [stage, "--preset", "tiny", *flags(**common, **options)]


OUTPUTS = {"sft": ("model.safetensors",), "reward": ("model.safetensors",), "dpo": ("model.safetensors",),
           "ppo": ("model.safetensors", "critic/model.safetensors"), "grpo": ("model.safetensors",),
           "rloo": ("model.safetensors",)}
LOGS = {"ppo": ("metrics.jsonl", "samples.jsonl"), "grpo": ("metrics.jsonl", "samples.jsonl"),
        "rloo": ("metrics.jsonl", "samples.jsonl")}


@pytest.fixture(scope="module")
def reference(zygote, data, reward_folder, tmp_path_factory):
    """One uninterrupted run per stage, shared by the tests: stage -> (output folder, seconds it ran)."""
    done = {}

    def get(stage):
        if stage not in done:
            out = tmp_path_factory.mktemp(f"{stage}-reference")
            status, seconds = zygote.run(stage_argv(stage, data, reward_folder) + flags(output_dir=out))
            assert status == 0, zygote.log_tail()
            done[stage] = out, seconds
        return done[stage]

    return get


# --- exact kill points -------------------------------------------------------------------------------------


def test_sft_killed_at_each_delicate_point_resumes_exactly(zygote, data, reference, tmp_path):
    """One SFT run killed seven times in a row, each time resumed, at the points where a kill could do harm;
    after each kill, the state it left; at the end, the same weights and rows as the uninterrupted run."""
    ref, _ = reference("sft")
    out = tmp_path / "sft"
    argv = stage_argv("sft", data) + flags(output_dir=out)
    resume = flags(resume="true")

    def killed(kill: str, resuming: bool = True):
        status, _ = zygote.run(argv + (resume if resuming else []), [kill])
        assert status == -signal.SIGKILL, f"{kill}: the run was not killed (status {status}):\n{zygote.log_tail()}"
        assert_no_damaged_checkpoint(out)
        return out / "checkpoints"

    def steps():
        return [s for s, _ in list_checkpoints(out)]

    # 1. Before any checkpoint exists (right after step 1 is logged).
    killed("closed:metrics.jsonl:1", resuming=False)
    assert steps() == [] and len(read_metrics(out / "metrics.jsonl")) == 1
    # 2. --resume without a checkpoint starts from step 0 (and says so); killed inside the first checkpoint
    #    write, when its temporary folder holds the model but no optimizer state yet.
    root = killed("save:optimizer.pt:1")
    assert "no checkpoint in" in zygote.log_tail(2000) and "starting from step 0" in zygote.log_tail(2000)
    assert steps() == [] and (root / ".tmp-step-2" / "model" / "model.safetensors").is_file()
    assert not (root / ".tmp-step-2" / "optimizer.pt").exists()
    # 3. Killed while the manifest of that checkpoint is half-written (all its files are there).
    root = killed("torn:manifest.json:1")
    assert steps() == [] and (root / ".tmp-step-2" / "optimizer.pt").is_file()
    # 4. Killed while the row of step 3 (the end of the first epoch) is half-appended to metrics.jsonl.
    killed("torn:metrics.jsonl:3")
    assert steps() == [2] and not (out / "metrics.jsonl").read_text().endswith("\n")
    # 5. Killed right after resume opened metrics.jsonl to drop the rows after the checkpoint (step 3's torn
    #    one): the rows of steps 1-2 must survive.
    killed("open:metrics.jsonl:1")
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] in ([1, 2], [1, 2, 3])
    # 6. Killed after checkpoint step-6 (an epoch boundary) was renamed into place, before the old ones
    #    beyond keep_last_n=2 were deleted.
    killed("replaced:checkpoints/step-6:1")
    assert steps() == [2, 4, 6]
    # 7. Killed in the middle of deleting step-4 (pruned after step-8, the last step, was written).
    killed("rmtree:step-4:1")
    assert 8 in steps() and 2 not in steps() and not (out / "model.safetensors").exists()
    # 8. Resumed from the last step: nothing left to train, the final model is written.
    status, _ = zygote.run(argv + resume)
    assert status == 0, zygote.log_tail()
    assert_same_run(ref, out)
    assert steps() == [6, 8]


def test_plain_cli_process_killed_mid_training_resumes_exactly(data, reference, tmp_path):
    """Without the zygote: `python -m rlhfkit.cli sft` in a fresh interpreter, SIGKILLed once its third
    metrics row is on disk, then resumed the same way; the same result as the (forked) reference run."""
    ref, _ = reference("sft")
    out = tmp_path / "sft"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "rlhfkit.cli", *stage_argv("sft", data), *flags(output_dir=out, resume="true")]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    metrics = out / "metrics.jsonl"
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and metrics.read_text().count("\n") >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait(RUN_TIMEOUT_S) == -signal.SIGKILL, proc.stdout.read().decode()[-3000:]
    assert_no_damaged_checkpoint(out)
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resuming from" in done.stdout
    assert_same_run(ref, out)


# --- kills at random moments --------------------------------------------------------------------------------


def kill_delay(rng: random.Random, reference: Path, seconds: float, out: Path, total: int) -> float:
    """A random moment in the run about to start: from late in its start-up (loading, resuming, verifying
    checkpoints) to about when an uninterrupted run would have finished the steps left to it."""
    training = sum(r.get("time/step_s", 0.0) for r in read_metrics(reference / "metrics.jsonl"))
    startup = max(seconds - training, 0.1)  # imports are paid by the zygote; includes checkpoint writes
    found = list_checkpoints(out)
    left = (total - found[-1][0]) / total if found else 1.0
    return rng.uniform(0.4 * startup, startup + training * left)


# (stage, steps, exact kill points tried first, random kills, seed)
RANDOM_KILLS = [
    ("sft", 8, [], 5, 11),
    ("reward", 6, [], 5, 12),
    # PPO also logs samples.jsonl (4 rows an iteration): first killed while iteration 2 appends its second
    # sample row (after checkpoint step-1), then while the resumed run appends iteration 3's metrics row.
    ("ppo", 4, ["torn:samples.jsonl:6", "torn:metrics.jsonl:3"], 4, 13),
    ("dpo", 6, [], 4, 14),
    ("grpo", 5, [], 3, 15),
    ("rloo", 5, [], 3, 16),
]


@pytest.mark.parametrize("stage, steps, exact, kills, seed", RANDOM_KILLS, ids=[k[0] for k in RANDOM_KILLS])
def test_killed_at_random_moments_resumes_exactly(zygote, data, reward_folder, reference, tmp_path, stage, steps,
                                                   exact, kills, seed):
    """Each attempt runs with --resume and is SIGKILLed after a seeded random delay drawn from the measured
    length of the uninterrupted run; the next attempt resumes from what it left. When an attempt finishes
    before its kill, the run is compared with the uninterrupted one and a new run starts, until `kills`
    kills have hit a running process."""
    ref, seconds = reference(stage)
    rng = random.Random(seed)
    report, hits, attempts, runs = [], 0, 0, 0

    def start_run():
        out = tmp_path / f"{stage}-{runs}"
        return out, stage_argv(stage, data, reward_folder) + flags(output_dir=out, resume="true")

    out, argv = start_run()
    for spec in exact:
        status, _ = zygote.run(argv, [spec])
        assert status == -signal.SIGKILL, f"{spec}: not killed (status {status}):\n{zygote.log_tail()}"
        report.append(f"{stage} at {spec}: {state_of(out)}")
        assert_no_damaged_checkpoint(out)
    # The reference's duration depends on the machine's load when it ran; when a run outpaces it and finishes
    # before its kill, later delays are drawn from a shorter span, so that the kills keep landing in runs.
    scale = 1.0
    while hits < kills and attempts < 3 * kills:
        attempts += 1
        delay = scale * kill_delay(rng, ref, seconds, out, steps)
        status, _ = zygote.run(argv, kill_after=delay)
        assert status in (0, -signal.SIGKILL), zygote.log_tail()
        if status == 0:
            report.append(f"{stage} run {runs}: finished before a kill after {delay:.2f} s; compared")
            assert_same_run(ref, out, OUTPUTS[stage], LOGS.get(stage, ("metrics.jsonl",)))
            runs += 1
            scale *= 0.6
            out, argv = start_run()
            continue
        hits += 1
        report.append(f"{stage} run {runs} kill {hits} after {delay:.2f} s (uninterrupted run: {seconds:.1f} s): "
                      f"{state_of(out)}")
        assert_no_damaged_checkpoint(out)
    print("\n" + "\n".join(report))
    assert hits >= kills - 1, report
    status, _ = zygote.run(argv)
    assert status == 0, zygote.log_tail()
    assert_same_run(ref, out, OUTPUTS[stage], LOGS.get(stage, ("metrics.jsonl",)))


# --- the fixes, in process ----------------------------------------------------------------------------------


def test_resume_drops_a_torn_last_metrics_row(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    log = MetricsLog(path, resume_step=2)
    log.write({"step": 3, "loss": 1.25})
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 3, "loss": 1.25}]
    assert path.read_text().endswith("\n") and not list(tmp_path.glob("*.tmp"))


def test_a_torn_row_in_the_middle_is_still_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError):
        read_metrics(path)


def test_resume_rewrites_metrics_through_a_rename(tmp_path, monkeypatch):
    """On resume the kept rows are rewritten; a kill right after a file is opened for that (truncated) must
    not lose them: they go to a temporary file renamed over metrics.jsonl."""
    import builtins
    import io

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    real_open = builtins.open

    class Killed(Exception):
        pass

    def open_then_die(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if "w" in mode:
            handle.close()
            raise Killed(file)
        return handle

    monkeypatch.setattr(builtins, "open", open_then_die)
    monkeypatch.setattr(io, "open", open_then_die)
    with pytest.raises(Killed):
        MetricsLog(path, resume_step=2)
    monkeypatch.undo()
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3}\n'


def test_pruning_renames_a_checkpoint_away_before_deleting_it(tmp_path, monkeypatch):
    """A kill while an old checkpoint is deleted leaves no half-deleted `step-N`, and the next save or
    resume clears what is left of it."""
    import shutil

    from rlhfkit.runtime import checkpoint

    class Killed(Exception):
        pass

    def save_model(folder):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"weights")

    for step in (1, 2):
        checkpoint.save_checkpoint(tmp_path, step, save_model, {}, {}, keep_last_n=2)
    real_rmtree = shutil.rmtree

    def rmtree(path, ignore_errors=False):
        if Path(path).name.endswith("step-1") and Path(path).is_dir():
            (Path(path) / "manifest.json").unlink()
            raise Killed
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", rmtree)
    with pytest.raises(Killed):
        checkpoint.save_checkpoint(tmp_path, 3, save_model, {}, {}, keep_last_n=2)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    assert checkpoint.latest_good_checkpoint(tmp_path)[0] == 3
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2", "step-3"]
