"""Several processes (torchrun, gloo, one thread each): SFT, reward and DPO take the same steps as one process.

Batch sizes are global: each micro-batch of the seeded order is split over the processes, losses are normalised
by global counts and gradients summed (DDP), so 2 processes must end where 1 process ends. They differ only in
the order of floating-point sums (a process sums its share first), a few float32 ulps of each gradient. AdamW
divides each gradient element by its own running magnitude, so where an element's gradient is itself at the
rounding level, that noise moves its weight by a visible fraction of the learning rate either way; elsewhere
the steps agree to a few ulps. So each tensor is compared by how far training moved it: the difference between
the two runs must stay under 1e-2 of the update's norm (measured on this CPU: at most 1.3e-3, DPO's v_proj;
1.6e-4 for the reward model), and the logged loss, gradient norm and metrics, reduced over processes, within
1e-4 relative. A missing or doubled share changes the update's direction, an O(1) difference; a gradient scaled
by the number of processes (which Adam's step would hide) shows in the logged gradient norm.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.models.loading import resolve_model_path
from rlhfkit.runtime.distributed import Processes, my_share, one_process_only, processes, sum_across
from rlhfkit.errors import UserError

from .helpers import keyword_pairs, write_jsonl

UPDATE_RTOL = 1e-2  # |w_1 - w_2| / |w_1 - w_start| per tensor (see above)


def test_shares_split_a_global_batch_and_one_process_is_the_identity(monkeypatch):
    two = [Processes(rank=r, world=2) for r in (0, 1)]
    assert [my_share([7, 3, 5, 1, 9], p) for p in two] == [[7, 5, 9], [3, 1]]
    assert [my_share([4], p) for p in two] == [[4], []]  # fewer examples than processes: one gets none
    assert my_share([1, 2], Processes()) == [1, 2] and sum_across([1.5, 2.0], Processes()) == [1.5, 2.0]
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert processes() == Processes(rank=3, world=4, local_rank=1) and not processes().main
    with pytest.raises(UserError, match=r"^ppo runs in one process for now \(4 were launched\)"):
        one_process_only("ppo")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run(args: list[str], nproc: int, tmp_path, timeout: int = 600, launcher: str = "torchrun"):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", RLHFKIT_DIST_TIMEOUT_S="120")
    if nproc == 1:
        command = [sys.executable]
    elif launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    else:  # accelerate's multi-GPU launcher is torchrun underneath; without a GPU the processes take the CPU
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={nproc}",
                   "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={_free_port()}"]
    return subprocess.run([*command, "-m", "rlhfkit", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=tmp_path)


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _same_run_on_one_and_two(stage: str, settings: list[str], tmp_path, launchers=("torchrun",)):
    """The stage run by one process, then by two under each launcher: [(weights, metric rows)] in that order."""
    results = []
    for n, launcher in [(1, None), *((2, name) for name in launchers)]:
        out = tmp_path / f"{stage}-{n}-{launcher}"
        done = _run([stage, "--preset", "tiny", "--mixed-precision", "no", "--output-dir", str(out),
                     "--progress", "false", *settings], n, tmp_path, launcher=launcher)
        assert done.returncode == 0, f"{n} process(es): {done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        assert done.stdout.count("device: ") == n  # every process chose its device: n really ran
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        results.append((_weights(out), rows))
    return results


def _assert_same(one: dict, two: dict, rows1: list, rows2: list, keys: tuple[str, ...]) -> None:
    start = load_file(str(resolve_model_path("tiny") / "model.safetensors"))
    assert one.keys() == two.keys()
    moved = 0
    for name in one:
        apart = (one[name] - two[name]).norm().item()
        if name in start and start[name].shape == one[name].shape:
            update = (one[name] - start[name]).norm().item()
            moved += update > 0
            assert apart <= UPDATE_RTOL * update, f"{name}: runs {apart:.2e} apart, update {update:.2e}"
        else:  # a head initialised by the stage (seeded, so the same in both runs)
            assert (one[name] - two[name]).abs().max().item() < 1e-5, name
    assert moved >= len(start) - 1, "training moved (almost) every tensor"
    assert [r["step"] for r in rows1] == [r["step"] for r in rows2]
    for a, b in zip(rows1, rows2):  # metrics reduced over processes before they are logged
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)


@pytest.mark.slow
def test_sft_on_two_processes_takes_the_steps_of_one_under_torchrun_and_accelerate(tmp_path):
    # 21 examples in micro-batches of 4: the last of an epoch has one example, so one process's share is empty.
    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"Say {w} {i}", "completion": f"{w} number {i}."}
                                                for i, w in enumerate("abcdefghijklmnopqrstu")])
    (one, rows1), *others = _same_run_on_one_and_two(
        "sft", ["--data", str(data), "--eval-fraction", "0", "--max-samples", "0", "--batch-size", "4",
                "--gradient-accumulation-steps", "2", "--max-steps", "4", "--save-every", "0"], tmp_path,
        launchers=("torchrun", "accelerate"))
    assert rows1[-1]["epoch"] > 1.0  # the empty share was met
    for two, rows2 in others:
        _assert_same(one, two, rows1, rows2, ("loss", "grad_norm", "sft/nll"))


@pytest.mark.slow
def test_reward_and_dpo_on_two_processes_take_the_steps_of_one(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", keyword_pairs(19, seed=3))
    common = ["--data", str(pairs), "--eval-fraction", "0", "--batch-size", "3", "--max-steps", "3",
              "--save-every", "0"]
    for stage, metric in (("reward", "reward/accuracy"), ("dpo", "dpo/margin")):
        (one, rows1), (two, rows2) = _same_run_on_one_and_two(stage, common, tmp_path)
        _assert_same(one, two, rows1, rows2, ("loss", "grad_norm", metric))


@pytest.mark.slow
def test_a_stage_without_multi_process_support_refuses_to_run_twice(tmp_path):
    done = _run(["ppo", "--preset", "tiny", "--output-dir", str(tmp_path / "ppo")], 2, tmp_path, timeout=300)
    assert done.returncode != 0 and not (tmp_path / "ppo").exists()
    assert "rlhfkit ppo: error: ppo runs in one process for now (2 were launched)" in done.stderr



@pytest.mark.slow
@pytest.mark.parametrize("first,then", [(1, 2), (2, 1)])
def test_sft_resumes_on_another_number_of_processes(tmp_path, first, then):
    """The main process writes full checkpoints (every process holds the same state) and the batch order is
    global, so a run checkpointed by `first` processes continues on `then` as if never interrupted."""
    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"Tell {w}", "completion": f"{w} {w}."} for w in "abcdefghijk"])
    settings = ["sft", "--preset", "tiny", "--mixed-precision", "no", "--progress", "false", "--data", str(data),
                "--eval-fraction", "0", "--batch-size", "4", "--max-steps", "4", "--save-every", "2"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert _run([*settings, "--output-dir", str(whole)], 1, tmp_path).returncode == 0
    assert _run([*settings, "--output-dir", str(cut)], first, tmp_path).returncode == 0
    shutil.rmtree(cut / "checkpoints" / "step-4")  # as if stopped after step 2's checkpoint
    done = _run([*settings, "--output-dir", str(cut), "--resume", "true"], then, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stdout and f"{cut / 'checkpoints' / 'step-2'}" in done.stdout
    rows = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    _assert_same(_weights(whole), _weights(cut), [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()],
                 rows, ("loss", "grad_norm", "sft/nll"))


def test_a_process_stops_with_its_peers_when_only_a_peer_was_signalled(tmp_path, monkeypatch):
    """A launcher signals each process on its own: the one that was not signalled learns of it in the per-step
    agreement, and checkpoints and stops at the same step as the signalled one."""
    from types import SimpleNamespace

    from rlhfkit.runtime.guard import NonFiniteGuard
    from rlhfkit.runtime.interrupt import TrainingStopped
    from rlhfkit.trainers import run_context

    seen = []
    monkeypatch.setattr(run_context, "processes", lambda: Processes(rank=0, world=2))
    monkeypatch.setattr(run_context, "max_across", lambda value, procs: seen.append(value) or 15.0)  # a peer: SIGTERM
    monkeypatch.setattr(run_context, "barrier", lambda procs: None)
    config = SimpleNamespace(save_every=0, keep_last_n=0, resume=False)
    run = run_context.RunContext(config, tmp_path, 10, NonFiniteGuard(3), {})
    with pytest.raises(TrainingStopped, match="stopped by SIGTERM after step 3") as stopped:
        run.checkpoint_when_due(3, lambda folder: folder.mkdir(parents=True), {})
    assert seen == [0.0] and stopped.value.exit_code == 143
    assert (tmp_path / "checkpoints" / "step-3" / "model").is_dir()
