"""AdamW: equal to torch.optim.AdamW, the correct_bias switch, state round trip."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from mtbert.model.optim import AdamW


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 3))


def data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, start: int = 0) -> None:
    x, y = data()
    for i in range(start, start + steps):
        rows = slice((i * 16) % 64, (i * 16) % 64 + 16)  # a different batch each step
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
        opt.step()


def max_param_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("weight_decay", [0.0, 0.01, 0.3])
def test_equals_torch_adamw_after_100_steps(weight_decay):
    ours_model, ref_model = small_model(), small_model()
    kwargs = dict(lr=3e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=weight_decay)
    train(ours_model, AdamW(ours_model.parameters(), **kwargs), 100)
    train(ref_model, torch.optim.AdamW(ref_model.parameters(), **kwargs), 100)
    assert max_param_diff(ours_model, small_model()) > 1e-2  # it did train
    assert max_param_diff(ours_model, ref_model) < 1e-6


def test_param_groups_and_params_without_grad():
    ours_model, ref_model = small_model(), small_model()

    def groups(model):
        decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
        no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
        return [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0, "lr": 1e-2}]

    for model in (ours_model, ref_model):
        model[0].weight.requires_grad_(False)  # frozen: no grad, no update, no decay
    ours = AdamW(groups(ours_model), lr=1e-3)
    ref = torch.optim.AdamW(groups(ref_model), lr=1e-3)
    train(ours_model, ours, 30)
    train(ref_model, ref, 30)
    assert torch.equal(ours_model[0].weight, small_model()[0].weight)
    assert max_param_diff(ours_model, ref_model) < 1e-6


def test_without_bias_correction_follows_the_documented_formula():
    torch.manual_seed(0)
    p0 = torch.randn(5, 4)
    grads = [torch.randn(5, 4) for _ in range(10)]
    lr, (b1, b2), eps, wd = 1e-2, (0.9, 0.999), 1e-6, 0.1

    p = nn.Parameter(p0.clone())
    opt = AdamW([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, correct_bias=False)
    ref = nn.Parameter(p0.clone())
    torch_opt = torch.optim.AdamW([ref], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)

    # Hand-written, in float64: decay, moments, update without bias correction.
    q, m, v = p0.double(), torch.zeros(5, 4, dtype=torch.float64), torch.zeros(5, 4, dtype=torch.float64)
    for g in grads:
        p.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        torch_opt.step()
        g = g.double()
        q = q * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        q = q - lr * m / (v.sqrt() + eps)
    assert (p.detach().double() - q).abs().max().item() < 1e-6
    # Early steps differ a lot from bias-corrected Adam (1 / (1 - 0.9) = 10x larger first step).
    assert (p - ref).abs().max().item() > 1e-2


def test_first_step_with_bias_correction_is_lr_sign_of_grad():
    p = nn.Parameter(torch.zeros(6))
    p.grad = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0, -6.0])
    AdamW([p], lr=0.1, eps=0.0, weight_decay=0.0).step()
    # m_hat = g and v_hat = g^2 after one corrected step, so the update is -lr * sign(g).
    assert torch.allclose(p.detach(), -0.1 * p.grad.sign(), atol=1e-7)


def test_state_dict_round_trip_continues_identically():
    model = small_model()
    opt = AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    train(model, opt, 20)

    # Save mid-run (through bytes, as a checkpoint file would), restore into fresh objects.
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = small_model(seed=123)
    resumed.load_state_dict(saved["model"])
    resumed_opt = AdamW(resumed.parameters(), lr=999.0)  # hyperparameters come from the state
    resumed_opt.load_state_dict(saved["opt"])
    assert resumed_opt.param_groups[0]["lr"] == 3e-3
    assert all(s["step"] == 20 for s in resumed_opt.state.values())

    train(model, opt, 15, start=20)
    train(resumed, resumed_opt, 15, start=20)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_loads_torch_adamw_state_with_tensor_steps():
    ours_model, ref_model = small_model(), small_model()
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=3e-3)
    train(ref_model, ref_opt, 10)
    ours_model.load_state_dict(ref_model.state_dict())
    ours_opt = AdamW(ours_model.parameters(), lr=3e-3)
    ours_opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
    train(ref_model, ref_opt, 10, start=10)
    train(ours_model, ours_opt, 10, start=10)
    assert max_param_diff(ours_model, ref_model) < 1e-6


def test_closure_and_invalid_arguments():
    p = nn.Parameter(torch.ones(3))
    opt = AdamW([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p * p).sum()
        loss.backward()
        return loss

    assert math.isclose(opt.step(closure).item(), 3.0)
    assert (p < 1).all()
    for bad in (dict(lr=-1.0), dict(betas=(1.0, 0.999)), dict(eps=-1e-8), dict(weight_decay=-0.1)):
        with pytest.raises(ValueError, match="invalid"):
            AdamW([p], **bad)
