"""Several processes (gloo, one thread each): every stage takes the same steps as one process, and resumes.

Batch sizes are global: each micro-batch of the seeded order is split over the processes, losses are normalised
by global counts and gradients summed (DDP), so 2 processes must end where 1 process ends. They differ only in
the order of floating-point sums (a process sums its share first), a few float32 ulps of each gradient. AdamW
divides each gradient element by its own running magnitude, so where an element's gradient is itself at the
rounding level, that noise moves its weight by a visible fraction of the learning rate either way; elsewhere
the steps agree to a few ulps. So each tensor is compared by how far training moved it: the difference between
the two runs must stay under 1e-2 of the update's norm (measured on this CPU: at most 1.3e-3, DPO's v_proj;
1.6e-4 for the reward model), and the logged loss, gradient norm and metrics, reduced over processes, within
1e-4 relative, or within 1e-2 of how far the metric has moved since the first step (the weights it is computed
from being that far apart: a GRPO/RLOO policy loss, a mean near zero of advantage-weighted terms, once differed
by 1.3e-6 on -0.0073). A missing or doubled share changes the update's direction, an O(1) difference; a gradient
scaled by the number of processes (which Adam's step would hide) shows in the logged gradient norm.

Launchers: every stage runs under `torchrun` or `accelerate launch` at least once here (SFT under both), and the
kill test needs torchrun's teardown. The other runs (one process, FSDP, resumes, the uneven end) are forked from a
zygote that imported torch and transformers once (tests/trainers/zygote.py) and given torchrun's environment:
the same `rlhfkit.cli.main` in real processes on gloo, without a launcher's and each process's 11 s of imports
(on a 2-core AVX2 CPU; this file went from 1308 to about 700 test-seconds).
"""

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.models.loading import resolve_model_path
from rlhfkit.runtime.distributed import Processes, my_share, one_process_only, processes, sum_across
from rlhfkit.errors import UserError

from .helpers import keyword_pairs, save_random_reward_model, write_jsonl
from .zygote import Zygote

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
    with pytest.raises(UserError, match=r"^pipeline runs in one process \(4 were launched\); run it without"):
        one_process_only("pipeline")


@pytest.mark.parametrize("lockstep", [False, True])
def test_each_process_runs_as_many_micro_batches_as_the_busiest_under_fsdp(lockstep):
    """A mini-batch of 5 rows over 2 processes in micro-batches of 2: process 0 holds 3 rows (2 micro-batches),
    process 1 holds 2 (1). Under FSDP (lockstep) process 1 adds one stand-in, whose loss counts zero, so both
    run the same forwards and backwards; under DDP it runs only its own."""
    from types import SimpleNamespace

    from rlhfkit.rollout.batch import build_rollout_batch
    from rlhfkit.rollout.experience import Experience
    from rlhfkit.trainers.rl_loop import my_micro_batches

    batch = build_rollout_batch([[1, 2]] * 6, [[3] * (i + 1) for i in range(6)], [True] * 6, 0)
    exp = Experience(batch, [{}] * 6, [""] * 6, scores=torch.zeros(6))
    algo = SimpleNamespace(parallel=SimpleNamespace(lockstep=lockstep), scaler=SimpleNamespace(backward=None))
    rows = torch.tensor([5, 0, 3, 1, 4])
    made = {rank: my_micro_batches(exp, rows, 2, torch.tensor(9.0), algo, Processes(rank=rank, world=2))
            for rank in (0, 1)}
    real = {rank: [mb.idx.tolist() for mb in mbs if mb.counts] for rank, mbs in made.items()}
    assert sorted(sum(real[0] + real[1], [])) == [0, 1, 3, 4, 5]  # every row once, in some process's share
    assert real == {0: [[3, 4], [5]], 1: [[0, 1]]}  # every other row (5, 3, 4 | 0, 1), shortest first
    assert len(made[0]) == 2 and len(made[1]) == (2 if lockstep else 1)
    if lockstep:
        assert not made[1][1].counts and made[1][1].idx.tolist() == [5]  # the mini-batch's first row


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


_ZYGOTE: list[Zygote] = []


def _zygote() -> Zygote:
    """This pytest worker's zygote (tests/trainers/zygote.py), started on first use."""
    if not _ZYGOTE or _ZYGOTE[0].proc.poll() is not None:
        _ZYGOTE[:] = [Zygote(Path(tempfile.mkdtemp(prefix="rlhfkit-zygote-")) / "runs.log", timeout=600)]
        atexit.register(_ZYGOTE[0].close)
    return _ZYGOTE[0]


def _run(args: list[str], nproc: int, tmp_path, timeout: int = 600, launcher: str = "zygote",
         path: tuple[str, ...] = (), env: dict | None = None):
    """`python -m rlhfkit ARGS` in `nproc` processes under `launcher` ('torchrun', 'accelerate', or 'zygote': forked
    from this worker's zygote with torchrun's environment; one process runs as without a launcher), in the folder
    `tmp_path`; `path`: folders put first on PYTHONPATH (the zygote runs their sitecustomize.py)."""
    if launcher == "zygote":
        logs = Path(tempfile.mkdtemp(dir=tmp_path, prefix="logs-"))
        return _zygote().launch(args, nproc, logs, env={"RLHFKIT_DIST_TIMEOUT_S": "120", **(env or {})},
                                cwd=tmp_path, path=path, timeout=timeout)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # reward functions: tests.*
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", RLHFKIT_DIST_TIMEOUT_S="120", **(env or {}),
               PYTHONPATH=os.pathsep.join([*path, root, *filter(None, [os.environ.get("PYTHONPATH")])]))
    if launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    else:  # accelerate's multi-GPU launcher is torchrun underneath; without a GPU the processes take the CPU
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={nproc}",
                   "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={_free_port()}"]
    return subprocess.run([*command, "-m", "rlhfkit", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=tmp_path)


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _same_run_on_one_and_two(stage: str, settings: list[str], tmp_path, launchers=("torchrun",), folders=None):
    """The stage run by one process, then by two under each launcher: [(weights, metric rows)] in that order
    (and the output folders appended to `folders`)."""
    results = []
    for n, launcher in [(1, "zygote"), *((2, name) for name in launchers)]:
        out = tmp_path / f"{stage}-{n}-{launcher}"
        # "-fsdp": distributed: fsdp; "-fsdp-frozen": its frozen models (reference, reward model) sharded too
        sharding = {"fsdp": ["--distributed", "fsdp"], "frozen": ["--distributed", "fsdp", "--fsdp-frozen", "shard"]}
        sharding = sharding.get(launcher.split("-")[-1], [])
        done = _run([stage, "--preset", "tiny", "--mixed-precision", "no", "--output-dir", str(out),
                     "--progress", "false", *settings, *sharding], n, tmp_path, launcher=launcher.split("-")[0])
        assert done.returncode == 0, f"{n} process(es): {done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        assert done.stdout.count("device: ") == n  # every process chose its device: n really ran
        assert ("fsdp_frozen: reference sharded over 2 processes" in done.stdout) == launcher.endswith("-frozen")
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        results.append((_weights(out), rows))
        if folders is not None:
            folders.append(out)
    return results


def _assert_same(one: dict, two: dict, rows1: list, rows2: list, keys: tuple[str, ...], heads_rtol=None) -> None:
    """Weights within UPDATE_RTOL of their update; a head the stage initialised (seeded alike) within 1e-5, or
    `heads_rtol` of its norm when it is trained (a critic's value head); metrics within 1e-4."""
    start = load_file(str(resolve_model_path("tiny") / "model.safetensors"))
    assert one.keys() == two.keys()
    moved = 0
    for name in one:
        apart = (one[name] - two[name]).norm().item()
        if name in start and start[name].shape == one[name].shape:
            update = (one[name] - start[name]).norm().item()
            moved += update > 0
            assert apart <= UPDATE_RTOL * update, f"{name}: runs {apart:.2e} apart, update {update:.2e}"
        elif heads_rtol is not None:
            assert apart <= heads_rtol * one[name].norm().item(), name
        else:  # a head initialised by the stage (seeded, so the same in both runs)
            assert (one[name] - two[name]).abs().max().item() < 1e-5, name
    assert moved >= len(start) - 1, "training moved (almost) every tensor"
    assert [r["step"] for r in rows1] == [r["step"] for r in rows2]
    for a, b in zip(rows1, rows2):  # metrics reduced over processes before they are logged
        for key in keys:
            # Once updates have run, the two runs' weights are up to UPDATE_RTOL of the update apart (above), so a
            # metric computed from them may be that fraction of its own movement since the first step apart: a
            # policy loss that is a small mean of larger terms (zero-mean advantages) is not within 1e-4 of itself.
            drift = UPDATE_RTOL * abs(a[key] - rows1[0][key])
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=max(1e-6, drift)), (a["step"], key)


# Layouts: name -> (processes, launcher, extra settings).
LAYOUTS = {"1": (1, "zygote", []), "2": (2, "torchrun", []), "2-accelerate": (2, "accelerate", []),
           "2-fsdp": (2, "zygote", ["--distributed", "fsdp"]), "1-fsdp": (1, "zygote", ["--distributed", "fsdp"]),
           "2-fsdp-frozen": (2, "zygote", ["--distributed", "fsdp", "--fsdp-frozen", "shard"])}

# One SFT run per layout serves every SFT test below (a module fixture, and `xdist_group` keeps those tests on one
# pytest worker so that it runs once): 21 examples in micro-batches of 4 with 2 accumulated, so the last
# micro-batch of an epoch has one example and one process's share is empty; 4 steps, checkpointed at 2 and 4.
SFT_TESTS = pytest.mark.xdist_group("sft-layouts")


def _runs_by_layout(root, settings: list[str]):
    """layout -> the output folder of `settings` run uninterrupted on that layout under `root`, each run made on
    its first use and then shared."""
    done_runs = {}

    def run(layout: str):
        if layout not in done_runs:
            n, launcher, extra = LAYOUTS[layout]
            out = root / layout
            done = _run([*settings, *extra, "--output-dir", str(out)], n, root, launcher=launcher)
            assert done.returncode == 0, f"{layout}: {done.stdout[-2000:]}\n{done.stderr[-4000:]}"
            assert done.stdout.count("device: ") == n  # every process chose its device: n really ran
            (root / f"{layout}.stdout").write_text(done.stdout)
            done_runs[layout] = out
        return done_runs[layout]
    return run


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """layout -> (output folder of the uninterrupted run on that layout, its settings)."""
    root = tmp_path_factory.mktemp("sft-layouts")
    data = write_jsonl(root / "sft.jsonl", [{"prompt": f"Say {w} {i}", "completion": f"{w} number {i}."}
                                            for i, w in enumerate("abcdefghijklmnopqrstu")])
    settings = ["sft", "--preset", "tiny", "--mixed-precision", "no", "--progress", "false", "--data", str(data),
                "--eval-fraction", "0", "--max-samples", "0", "--batch-size", "4", "--gradient-accumulation-steps",
                "2", "--max-steps", "4", "--save-every", "2"]
    runs = _runs_by_layout(root, settings)
    return lambda layout: (runs(layout), settings)


def _rows(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@SFT_TESTS
def test_sft_on_two_processes_takes_the_steps_of_one_under_torchrun_and_accelerate(sft_run):
    one, _ = sft_run("1")
    assert _rows(one)[-1]["epoch"] > 1.0  # the empty share was met
    for layout in ("2", "2-accelerate", "2-fsdp"):
        two, _ = sft_run(layout)
        _assert_same(_weights(one), _weights(two), _rows(one), _rows(two), ("loss", "grad_norm", "sft/nll"))


@pytest.mark.slow
def test_reward_and_dpo_on_two_processes_take_the_steps_of_one(tmp_path):
    """With DDP (reward under torchrun, DPO under `accelerate launch`: the launchers differ only in how they
    start the processes, so CI runs each stage under one of them) and with FSDP (forked from the zygote)."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", keyword_pairs(19, seed=3))
    common = ["--data", str(pairs), "--eval-fraction", "0", "--batch-size", "3", "--max-steps", "3",
              "--save-every", "0"]
    for stage, metric, launcher in (("reward", "reward/accuracy", "torchrun"), ("dpo", "dpo/margin", "accelerate")):
        (one, rows1), *others = _same_run_on_one_and_two(stage, common, tmp_path,
                                                         launchers=(launcher, "zygote-fsdp"))
        for two, rows2 in others:
            _assert_same(one, two, rows1, rows2, ("loss", "grad_norm", metric))


@pytest.mark.slow
def test_the_held_out_evaluation_is_shared_out_and_adds_up_to_one_process(tmp_path):
    """8 held-out pairs in batches of 3: process 0 scores batches 0 and 2, process 1 batch 1, and the counts are
    added over processes, under DDP and under FSDP (the model gathered once, so that the processes' different
    numbers of forwards need no peer). With a learning rate of 0 every run evaluates the same weights: the
    numbers are one process's, up to the order of float64 sums."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", keyword_pairs(20, seed=3))  # 8 of them held out (by prompt)
    settings = ["--data", str(pairs), "--eval-fraction", "0.4", "--eval-every", "1", "--batch-size", "3",
                "--max-steps", "2", "--save-every", "0", "--learning-rate", "0"]
    (_, rows1), *others = _same_run_on_one_and_two("reward", settings, tmp_path, launchers=("zygote", "zygote-fsdp"))
    evals = [[{k: v for k, v in row.items() if k.startswith("eval/")} for row in rows1]]
    evals += [[{k: v for k, v in row.items() if k.startswith("eval/")} for row in rows2] for _, rows2 in others]
    assert [sorted(row) for row in evals[0]] == [["eval/accuracy", "eval/loss"]] * 2
    for two in evals[1:]:
        for a, b in zip(evals[0], two):
            assert b["eval/accuracy"] == a["eval/accuracy"]
            assert b["eval/loss"] == pytest.approx(a["eval/loss"], rel=1e-9)


@pytest.mark.slow
def test_the_demo_refuses_to_run_under_a_launcher(tmp_path):
    done = _run(["demo", "--preset", "demo-tiny", "--output-dir", str(tmp_path / "demo")], 2, tmp_path, timeout=300)
    assert done.returncode != 0 and not (tmp_path / "demo").exists()
    assert "rlhfkit demo: error: demo runs in one process (2 were launched); run it without torchrun" in done.stderr


@pytest.mark.slow
@SFT_TESTS
@pytest.mark.parametrize("first,then", [("1", "2"), ("2", "1"), ("2-fsdp", "2-fsdp"), ("2-fsdp", "1"),
                                        ("1-fsdp", "2-fsdp")])
def test_sft_resumes_on_another_number_of_processes(sft_run, tmp_path, first, then):
    """Several processes write checkpoints with torch.distributed.checkpoint (FSDP: each its shards; DDP: each a
    share of the replicated tensors), which reads them back into any layout; a one-process run under
    `distributed: fsdp` writes them too, so that it continues on two, and a plain one-process checkpoint resumes
    under DDP. The batch order
    is global, so a run checkpointed by `first` continues on `then` as if never interrupted: within rounding
    of the uninterrupted one-process run, and bit for bit that of an uninterrupted run on the same layout."""
    whole, _ = sft_run("1")
    uninterrupted, settings = sft_run(first)
    cut = tmp_path / "cut"
    shutil.copytree(uninterrupted, cut)
    assert (cut / "checkpoints" / "step-2" / "sharded").is_dir() == (first != "1")  # DCP but for one DDP process
    shutil.rmtree(cut / "checkpoints" / "step-4")  # as if stopped after step 2's checkpoint
    n, launcher, extra = LAYOUTS[then]
    done = _run([*settings, *extra, "--output-dir", str(cut), "--resume", "true"], n, tmp_path, launcher=launcher)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stdout and f"{cut / 'checkpoints' / 'step-2'}" in done.stdout
    assert [r["step"] for r in _rows(cut)] == [1, 2, 3, 4]
    _assert_same(_weights(whole), _weights(cut), _rows(whole), _rows(cut), ("loss", "grad_norm", "sft/nll"))
    if first != "1":  # model and optimizer in DCP's files only
        assert not (cut / "checkpoints" / "step-2" / "model").exists()
        assert not (cut / "checkpoints" / "step-2" / "optimizer.pt").exists()
    if first == then:
        reference = _weights(uninterrupted)
        assert all(torch.equal(reference[name], tensor) for name, tensor in _weights(cut).items())


@pytest.mark.slow
def test_a_one_process_ddp_checkpoint_is_not_resumed_under_fsdp(tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"Tell {w}", "completion": f"{w}."} for w in "abcdef"])
    settings = ["sft", "--preset", "tiny", "--progress", "false", "--data", str(data), "--eval-fraction", "0",
                "--batch-size", "2", "--max-steps", "2", "--save-every", "1", "--output-dir", str(tmp_path / "cut")]
    assert _run(settings, 1, tmp_path).returncode == 0
    done = _run([*settings, "--resume", "true", "--distributed", "fsdp"], 2, tmp_path)
    assert done.returncode == 2  # each process exits with status 2
    assert (f"rlhfkit sft: error: {tmp_path / 'cut' / 'checkpoints' / 'step-2'}: written by one process with "
            f"distributed: ddp; resume it with ddp") in done.stderr


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


def _samples(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]


# One PPO run on each layout serves the PPO tests below (as the SFT runs above): 6 prompts per iteration,
# mini-batches of 3, 4 iterations checkpointed at 2 and 4, samples and gold scores at every one.
PPO_TESTS = pytest.mark.xdist_group("ppo-runs")


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
    """layout ("1", "2", "2-fsdp") -> (output folder of the uninterrupted run, its settings, the root its data
    lies in)."""
    root = tmp_path_factory.mktemp("ppo-runs")
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": f"Say something about item {i}"} for i in range(12)])
    rm = save_random_reward_model(root / "rm")
    settings = ["ppo", "--preset", "tiny", "--mixed-precision", "no", "--progress", "false", "--data", str(prompts),
                "--reward-model", str(rm), "--rollout-batch-size", "6", "--mini-batch-size", "3", "--max-steps", "4",
                "--save-every", "2", "--sample-every", "1", "--gold-scorer", "tests.trainers.rewards:positional",
                # The adaptive KL controller, moved by up to 20% an iteration: it must see the global mean KL.
                "--adaptive-kl", "true", "--kl-target", "0.002", "--kl-horizon", "6"]
    runs = _runs_by_layout(root, settings)
    return lambda layout: (runs(layout), settings, root)


@pytest.mark.slow
@PPO_TESTS
@pytest.mark.parametrize("layout", ["2", "2-fsdp", "2-fsdp-frozen"])
def test_ppo_on_two_processes_samples_and_steps_as_one(ppo_run, layout):
    """6 prompts per iteration: each process samples and scores 3, seeded by their global index, so the
    responses are the very ones one process samples; GAE, whitening and the KL run on the gathered batch, and
    the mini-batches of 3 split 2 + 1 over the processes. Policy and critic end where one process ends them.
    Under FSDP each rollout samples and scores with the policy and critic gathered whole (each process's
    responses end at their own lengths), and the process with one row of a mini-batch fewer takes part with
    a stand-in. With `fsdp_frozen: shard` the reference and the reward model are sharded too, and gathered whole
    only for their own scoring pass."""
    (one, *_), (two, _, root) = ppo_run("1"), ppo_run(layout)
    sharded = "fsdp_frozen: reference, reward model sharded over 2 processes"
    assert (sharded in (root / f"{layout}.stdout").read_text()) == (layout == "2-fsdp-frozen")
    rows1, rows2 = _rows(one), _rows(two)
    _assert_same(_weights(one), _weights(two), rows1, rows2, (
        "objective/scores", "objective/kl", "objective/kl_coef", "objective/gold", "loss/policy", "loss/value",
        "grad_norm/policy", "grad_norm/critic", "ppo/explained_variance", "response/length_mean"))
    coefs = [r["objective/kl_coef"] for r in rows1]
    assert len(set(coefs)) == len(coefs)  # the controller moved at every iteration
    _assert_same(_weights(one / "critic"), _weights(two / "critic"), [], [], (), heads_rtol=1e-3)
    first, second = _samples(one), _samples(two)
    assert [s["response"] for s in first] == [s["response"] for s in second] and len(first) == 16
    assert [s["score"] for s in second] == pytest.approx([s["score"] for s in first], rel=1e-4, abs=1e-5)
    assert rows1[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6) and abs(rows1[-1]["objective/kl"]) > 1e-4  # the policy moved


# Run first by every process of a job given its folder in `path` (Python imports it at start from PYTHONPATH; the
# zygote runs it): process 0 samples EOS as the first token of every response, whatever the model's logits say.
EOS_ON_RANK_0 = """
import os
if os.environ.get("RANK") == "0":
    import torch
    from rlhfkit.rollout import generate
    eos, real = int(os.environ["TEST_EOS_ID"]), generate.sample_from_logits
    generate.sample_from_logits = lambda logits, *a, **k: torch.full_like(real(logits, *a, **k), eos)
"""


@pytest.mark.slow
@PPO_TESTS
@pytest.mark.parametrize("layout", ["2", "2-fsdp"])
def test_a_process_whose_responses_all_end_at_once_does_not_hang_its_peer(ppo_run, tmp_path, layout):
    """A forced uneven end of generation: process 0's responses all end at their first token (EOS), process 1's
    run their 12 tokens. Process 0 finishes decoding first and must still meet its peer in every collective that
    follows (the gathered experience, DDP's gradient reduce, FSDP's gathers and lockstep micro-batches), and the
    run must end, within a timeout, with the lengths of both processes' responses in its metrics."""
    from rlhfkit.models.loading import load_tokenizer

    reference, settings, root = ppo_run(layout)
    (tmp_path / "sitecustomize.py").write_text(EOS_ON_RANK_0)
    n, _, extra = LAYOUTS[layout]
    out = tmp_path / "uneven"
    started = time.monotonic()
    done = _run([*settings, *extra, "--output-dir", str(out)], n, root, timeout=300, path=(str(tmp_path),),
                env={"TEST_EOS_ID": str(load_tokenizer("tiny").eos_token_id)})
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    assert time.monotonic() - started < 300
    before, rows = _rows(reference)[0], _rows(out)
    # Without the patch no response ends (the tiny model's 12 tokens, none of them EOS), so process 0's three
    # responses are the ones that ended, one token each, and process 1's three keep their 12.
    assert before["response/ended_fraction"] == 0 and before["response/length_mean"] == 12
    assert rows[0]["response/ended_fraction"] == 0.5 and rows[0]["response/length_mean"] == (3 * 1 + 3 * 12) / 6
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and (out / "model.safetensors").is_file()
    assert all(r["response/ended_fraction"] >= 0.5 for r in rows)


@pytest.mark.slow
def test_grpo_and_rloo_on_two_processes_take_the_steps_of_one(tmp_path):
    """GRPO: 3 prompts x 2 samples, so one process holds 2 groups and the other 1 (a group never straddles
    processes), and the group statistics are logged. RLOO: 1 prompt per step, so the second process has no
    share at all (it samples nothing, and takes part with zero gradients), and mini-batches of 1 leave one
    process idle in every optimizer step; it must neither hang nor change the step. Both again under FSDP
    (RLOO's reference sharded too: `fsdp_frozen: shard`), where the idle process still enters each rollout's
    gathers and runs a stand-in micro-batch (timeout: 600 s
    per run, RLHFKIT_DIST_TIMEOUT_S 120 s per collective). GRPO is launched with torchrun, RLOO with
    `accelerate launch`."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Say something about item {i}", "item": i}
                                                       for i in range(12)])
    common = ["--data", str(prompts), "--reward-function", "tests.trainers.rewards:aligned_tokens",
              "--max-steps", "3", "--save-every", "0", "--learning-rate", "1e-3", "--beta", "0.05"]
    (one, rows1), *others = _same_run_on_one_and_two(
        "grpo", [*common, "--prompts-per-step", "3", "--num-generations", "2", "--mini-batch-size", "6",
                 "--num-iterations", "2"], tmp_path, launchers=("torchrun", "torchrun-fsdp"))
    for two, rows2 in others:
        _assert_same(one, two, rows1, rows2, ("objective/scores", "objective/kl", "grpo/reward_mean",
                                              "grpo/reward_std_within_group", "grpo/frac_zero_std_groups",
                                              "loss/policy", "grad_norm/policy", "ppo/approx_kl"))
    (one, rows1), *others = _same_run_on_one_and_two(
        "rloo", [*common, "--prompts-per-step", "1", "--num-generations", "4", "--mini-batch-size", "1"], tmp_path,
        launchers=("accelerate", "zygote-fsdp-frozen"))
    for two, rows2 in others:
        _assert_same(one, two, rows1, rows2, ("objective/scores", "objective/kl", "loss/policy", "grad_norm/policy"))


@pytest.mark.slow
def test_annotate_and_eval_on_two_processes_write_what_one_writes(tmp_path):
    """Each process samples and scores its share of the prompts (5 prompts: 3 and 2), every response from its
    own seed; the main process gathers and writes: the same files as one process, KL and proxy scores within
    float32 rounding of the batch they were scored in. Annotate is launched with torchrun, eval with
    `accelerate launch`."""
    from rlhfkit.models.loading import load_tokenizer
    from rlhfkit.models.tiny import build_tiny_model

    other = tmp_path / "other"
    tokenizer = load_tokenizer("tiny")
    build_tiny_model(tokenizer, seed=5).save_pretrained(other)
    tokenizer.save_pretrained(other)
    rm = save_random_reward_model(tmp_path / "rm")  # a saved head (a missing one is drawn afresh at each load)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Tell me about {w}"} for w in "abcde"])
    outs = {}
    launched_by = {"annotate": "torchrun", "eval": "accelerate"}  # one launcher each: they differ only in the start
    for stage, settings in (
            ("annotate", ["--responses-per-prompt", "3", "--num-prompts", "5", "--batch-size", "4",
                          "--gold-scorer", "tests.annotate.gold_len:score"]),
            ("eval", ["--ref-model", str(other), "--reward-model", str(rm), "--samples-per-prompt", "2",
                      "--max-new-tokens", "8", "--best-of-n", "2", "--batch-size", "3"])):
        for n in (1, 2):
            out = outs[stage, n] = tmp_path / f"{stage}-{n}"
            done = _run([stage, "--preset", "tiny", "--mixed-precision", "no", "--data", str(prompts),
                         "--output-dir", str(out), "--progress", "false", *settings], n, tmp_path, timeout=300,
                        launcher=launched_by[stage] if n == 2 else "zygote")
            assert done.returncode == 0, f"{stage} on {n}: {done.stdout[-2000:]}\n{done.stderr[-4000:]}"
            assert done.stdout.count("device: ") == n
    for name in ("rankings.jsonl", "preferences.jsonl", "gold_scores.jsonl"):
        assert (outs["annotate", 2] / name).read_text() == (outs["annotate", 1] / name).read_text(), name
    one, two = (json.loads((outs["eval", n] / "eval.json").read_text()) for n in (1, 2))
    assert two.keys() == one.keys() and two["n"] == one["n"] == 10
    for key in one:
        if key.endswith("_mean"):
            assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-5), key
    assert [row["n"] for row in two["best_of_n"]] == [1, 2]
    for a, b in zip(one["best_of_n"], two["best_of_n"]):
        assert b["gold_reward_mean"] == pytest.approx(a["gold_reward_mean"], rel=1e-6)
    rows = [[json.loads(x) for x in (outs["eval", n] / "samples.jsonl").read_text().splitlines()] for n in (1, 2)]
    for field in ("response", "reference_response", "gold"):
        assert [r[field] for r in rows[1]] == [r[field] for r in rows[0]], field
    assert [r["proxy"] for r in rows[1]] == pytest.approx([r["proxy"] for r in rows[0]], rel=1e-4, abs=1e-5)


@pytest.mark.slow
@PPO_TESTS
@pytest.mark.parametrize("first,then", [("2-fsdp", "2-fsdp"), ("2-fsdp", "1"), ("1", "2"), ("1-fsdp", "2-fsdp")])
def test_ppo_resumes_on_the_same_or_another_number_of_processes(ppo_run, tmp_path, first, then):
    """An FSDP run's checkpoint holds policy, critic and both optimizers sharded (torch.distributed.checkpoint):
    resumed on the same layout it ends bit for bit where the uninterrupted run ends, with the same samples; on
    one process, within rounding of it. A one-process run's checkpoint resumes on two processes (DDP), within
    rounding, and so does a one-process FSDP run's (written sharded too) under FSDP."""
    uninterrupted, settings, root = ppo_run(first)
    cut = tmp_path / "cut"
    shutil.copytree(uninterrupted, cut)
    assert (cut / "checkpoints" / "step-2" / "sharded").is_dir() == (first != "1")  # DCP but for one DDP process
    shutil.rmtree(cut / "checkpoints" / "step-4")  # as if stopped after step 2's checkpoint
    n, _, extra = LAYOUTS[then]
    done = _run([*settings, *extra, "--output-dir", str(cut), "--resume", "true"], n, root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {cut / 'checkpoints' / 'step-2'} " in done.stdout
    assert [r["step"] for r in _rows(cut)] == [1, 2, 3, 4]
    if first == then:
        for folder in (".", "critic"):
            whole, resumed = _weights(uninterrupted / folder), _weights(cut / folder)
            assert all(torch.equal(whole[name], resumed[name]) for name in whole), folder
        assert [s["response"] for s in _samples(cut)] == [s["response"] for s in _samples(uninterrupted)]
    else:
        _assert_same(_weights(uninterrupted), _weights(cut), _rows(uninterrupted), _rows(cut),
                     ("objective/scores", "loss/policy", "loss/value"))
        # The KL is a mean of sums of log-prob differences near 0.002 here: each log-prob (about -11 for a
        # 49k vocabulary) carries float32 rounding of about 1e-6, and a response sums up to 16 of them.
        for a, b in zip(_rows(uninterrupted), _rows(cut)):
            assert b["objective/kl"] == pytest.approx(a["objective/kl"], abs=2e-5), a["step"]


def _rank_pid(marker: str, rank: int) -> int | None:
    """The pid of the launched process with this rank whose environment carries `marker`."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            env = open(f"/proc/{entry}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if marker.encode() in env and f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
            return int(entry)
    return None


@pytest.mark.slow
@PPO_TESTS
def test_a_killed_process_stops_the_job_and_resume_loses_nothing(ppo_run, tmp_path):
    """SIGKILL of one of two PPO processes after the step-2 checkpoint: torchrun tears the whole job down,
    and `--resume` on two processes ends bit for bit where an uninterrupted two-process run ends, with the
    same samples."""
    from rlhfkit.runtime.checkpoint import checkpoint_problem, list_checkpoints

    whole, settings, root = ppo_run("2")
    cut = tmp_path / "cut"
    marker = f"RLHFKIT_TEST_RUN={cut}"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", RLHFKIT_DIST_TIMEOUT_S="120",
               RLHFKIT_TEST_RUN=str(cut), PYTHONPATH=os.path.dirname(os.path.dirname(os.path.dirname(
                   os.path.abspath(__file__)))))
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                            "-m", "rlhfkit", *settings, "--output-dir", str(cut)], cwd=root, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = None
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and job.poll() is None:
            intact = [step for step, path in list_checkpoints(cut) if checkpoint_problem(path) is None]
            if intact and max(intact) >= 2:
                killed = _rank_pid(marker, 1)
                os.kill(killed, signal.SIGKILL)
                break
            time.sleep(0.02)
        output, _ = job.communicate(timeout=180)
    finally:
        if job.poll() is None:
            job.kill()
    assert killed is not None, "the job ended before it could be killed"
    assert job.returncode != 0 and "Signal 9 (SIGKILL)" in output, output[-3000:]
    assert not (cut / "model.safetensors").exists()  # the job stopped before the end
    done = _run([*settings, "--output-dir", str(cut), "--resume", "true"], 2, root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {cut / 'checkpoints' / 'step-2'} " in done.stdout
    one, two = _weights(whole), _weights(cut)
    assert all(torch.equal(one[name], two[name]) for name in one)
    assert all(torch.equal(a, b) for a, b in zip(_weights(whole / "critic").values(), _weights(cut / "critic").values()))
    rows = _rows(cut)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["objective/scores"] for r in rows] == [r["objective/scores"] for r in _rows(whole)]
    assert [s["response"] for s in _samples(cut)] == [s["response"] for s in _samples(whole)]


@pytest.mark.slow
def test_lora_sft_under_fsdp_trains_the_adapter_one_process_trains(tmp_path):
    """FSDP2 shards each layer's frozen base weights together with its adapters; only the adapters get gradients,
    and the adapter folder written from the gathered weights is the one-process one (measured: 2e-7 apart,
    relative)."""
    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"Say {w} {i}", "completion": f"{w} number {i}."}
                                                for i, w in enumerate("abcdefghijklm")])
    outs = []
    for n, extra in ((1, []), (2, ["--distributed", "fsdp"])):
        outs.append(tmp_path / f"lora-{n}")
        done = _run(["sft", "--preset", "tiny", "--mixed-precision", "no", "--progress", "false", "--data", str(data),
                     "--eval-fraction", "0", "--batch-size", "4", "--max-steps", "3", "--lora-r", "4",
                     "--learning-rate", "1e-2", "--output-dir", str(outs[-1]), *extra], n, tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = (load_file(str(out / "adapter_model.safetensors")) for out in outs)
    assert one.keys() == two.keys() and len(one) == 28  # q, k, v, o, gate, up, down x A, B x 2 layers
    for name in one:
        assert (one[name] - two[name]).norm() <= 1e-4 * one[name].norm(), name
    assert not (outs[1] / "model.safetensors").exists()  # the adapter only, as with one process


@pytest.mark.slow
def test_lora_ppo_under_fsdp_trains_the_adapters_one_process_trains(tmp_path):
    """LoRA PPO: one base carries the policy and critic adapters (and is the reference with them off); under
    FSDP that base is sharded once, and the critic's value head, which lives outside it, is averaged over the
    processes by hand. The reward model, a model of its own, is sharded too (`fsdp_frozen: shard`, the layout
    that fits phi-2 on 5 T4s): the reference scores with the gathered base, the reward model in its own pass.
    Both adapters and the head end where one process ends them (measured: at most 2e-5 apart relative to each
    tensor, the policy adapters' B matrices, which start at zero)."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Say something about item {i}"} for i in range(12)])
    rm = save_random_reward_model(tmp_path / "rm")
    outs = []
    for layout in ("1", "2-fsdp-frozen"):
        n, _, extra = LAYOUTS[layout]
        outs.append(tmp_path / f"lora-{layout}")
        done = _run(["ppo", "--preset", "tiny", "--mixed-precision", "no", "--progress", "false", "--data",
                     str(prompts), "--reward-model", str(rm), "--rollout-batch-size", "6", "--mini-batch-size", "3",
                     "--max-steps", "3", "--save-every", "0", "--lora-r", "4", "--learning-rate", "1e-2",
                     "--output-dir", str(outs[-1]), *extra], n, tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        assert ("fsdp_frozen: reward model sharded over 2 processes" in done.stdout) == (n == 2)
    for name, count in (("adapter_model.safetensors", 28), ("critic/adapter_model.safetensors", 28),
                        ("critic/value_head.safetensors", 1)):
        one, two = (load_file(str(out / name)) for out in outs)
        assert one.keys() == two.keys() and len(one) == count, name
        for key in one:
            assert (one[key] - two[key]).norm() <= 1e-3 * one[key].norm(), (name, key)
    first, second = (_rows(out) for out in outs)
    assert [r["objective/scores"] for r in second] == pytest.approx([r["objective/scores"] for r in first], rel=1e-5)
    assert not (outs[1] / "model.safetensors").exists()  # adapters only, as with one process
