import math

import pytest
import torch

from rlhfkit.runtime.checkpoint import list_checkpoints, save_checkpoint
from rlhfkit.runtime.batch_order import BatchOrder
from rlhfkit.trainers.optim import lr_factor, param_groups


def test_warmup_then_cosine_and_linear_decay():
    # 10 steps, 2 of warm-up: factors 1/2, 2/2, then decay over the remaining 8.
    assert [lr_factor(s, 10, 2, "cosine") for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, 10, 2, "cosine") == 1.0
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)          # halfway: (1 + cos(pi/2)) / 2
    assert lr_factor(10, 10, 2, "cosine") == pytest.approx(0.0)
    assert lr_factor(6, 10, 2, "linear") == pytest.approx(0.5)
    assert lr_factor(9, 10, 2, "constant") == 1.0
    assert lr_factor(4, 10, 0, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.4)))


def test_no_weight_decay_on_biases_and_norms_and_head_lr_override():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    groups = param_groups(model.named_parameters(), 0.1, 1e-3, {"1.": 5e-3})
    by = {(g["weight_decay"], g["lr"]): len(g["params"]) for g in groups}
    assert by == {(0.1, 1e-3): 1, (0.0, 1e-3): 1, (0.0, 5e-3): 2}


def test_batch_order_is_a_pure_function_of_seed_and_position():
    order = BatchOrder(10, 4, seed=7)
    first_epoch = [order.indices(i) for i in range(3)]
    assert sorted(sum(first_epoch, [])) == list(range(10)) and len(first_epoch[-1]) == 2
    fresh = BatchOrder(10, 4, seed=7)
    assert fresh.indices(4) == order.indices(4) and fresh.indices(1) == first_epoch[1]
    assert BatchOrder(10, 4, seed=8).indices(0) != first_epoch[0]


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

    def save_model(folder):
        folder.mkdir()
        (folder / "weights.bin").write_bytes(b"x")

    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, save_model, {"optimizer": optimizer, "scheduler": scheduler},
                        {"microbatch": step}, keep_last_n=2)
    # A write that died half-way leaves only a temporary folder, which is never taken for a checkpoint.
    (tmp_path / "checkpoints" / ".tmp-step-8").mkdir()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 6]
    assert (tmp_path / "checkpoints" / "step-6" / "optimizer.pt").is_file()
