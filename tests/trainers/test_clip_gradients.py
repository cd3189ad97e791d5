"""clip_gradients equals torch's clip_grad_norm_ bit for bit, below, at and above the limit."""

import pytest
import torch

from rlhfkit.trainers.optim import clip_gradients


def _model_with_grads(scale: float) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3, bias=False))
    (model(torch.randn(4, 7)).square().sum() * scale).backward()
    return model


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("max_norm", [0.5, 1.0, float("inf")])
def test_same_gradients_and_norm_as_clip_grad_norm(scale, max_norm):
    ours, theirs = _model_with_grads(scale), _model_with_grads(scale)
    norm = clip_gradients(list(ours.parameters()), max_norm)
    expected = torch.nn.utils.clip_grad_norm_(list(theirs.parameters()), max_norm)
    assert norm == float(expected)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a.grad, b.grad)


def test_a_norm_just_below_the_limit_still_scales_as_torch_does():
    """torch scales by max_norm / (norm + 1e-6) whenever that is below 1, even for norm a hair under max_norm."""
    model, ours, theirs = _model_with_grads(1.0), _model_with_grads(1.0), _model_with_grads(1.0)
    norm = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
    clip_gradients(list(ours.parameters()), norm + 1e-7)
    torch.nn.utils.clip_grad_norm_(list(theirs.parameters()), norm + 1e-7)
    for a, b, before in zip(ours.parameters(), theirs.parameters(), model.parameters()):
        assert torch.equal(a.grad, b.grad)
        assert not torch.equal(a.grad, before.grad)


def test_non_finite_gradients_report_a_non_finite_norm():
    model = _model_with_grads(1.0)
    next(model.parameters()).grad[0, 0] = float("nan")
    assert clip_gradients(list(model.parameters()), 1.0) != clip_gradients(list(model.parameters()), 1.0)  # nan
