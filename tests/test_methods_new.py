"""UPGrad, FairGrad and FAMO (mtbert.mtl.methods): each against an independent oracle
(TorchJD's UPGrad and FairGrad; a transcription of the official FAMO update in torch),
the optimality conditions and special cases their papers state, argument errors, state
round trips, degenerate gradients, and a short training run that resumes exactly."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

import mtbert.aggregation as agg
from mtbert.checkpoint import format as ckpt
from mtbert.cli import train_cmd
from mtbert.mtl.methods.upgrad import dual_cone_weights
from mtbert.training import TrainConfig, train

from conftest import assert_same_end, stop_after_first_checkpoint, tiny_config
from test_aggregation import KINDS, SETTINGS, grad_cases, input_scale, make_grads, rel_err

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
NEW = ("upgrad", "fairgrad", "famo")


def torchjd_aggregation():
    """TorchJD's aggregators (a dev dependency on Python >= 3.10, the versions it supports)."""
    try:
        import torchjd.aggregation as jd
        from torchjd._linalg import QuadprogProjector  # noqa: F401  (needs qpsolvers, quadprog)
    except ImportError as e:
        if sys.version_info < (3, 10):
            pytest.skip("torchjd needs Python >= 3.10")
        if IN_CI:
            pytest.fail(f"torchjd is a dev dependency (pip install torchjd qpsolvers quadprog): {e}")
        pytest.skip(f"torchjd is not installed: {e}")
    return jd


# --------------------------------------------------------------------------------------
# UPGrad
# --------------------------------------------------------------------------------------


def test_upgrad_matches_torchjd_on_the_exact_qp():
    jd = torchjd_aggregation()
    from torchjd._linalg import QuadprogProjector

    exact = jd.UPGrad(projector=QuadprogProjector(norm_eps=0.0, reg_eps=0.0))  # the QP on G itself
    for kind in ("random", "opposed", "aligned"):
        for T, seed in [(2, 1), (3, 2), (5, 3), (8, 4)]:
            g = make_grads(kind, T, 60, seed)
            ours = agg.aggregate(g, "upgrad")
            theirs = exact(g)
            assert rel_err(ours, theirs, 1e-3 * input_scale(g)) <= 1e-10, (kind, T)


def test_upgrad_pins_torchjds_regularized_default():
    # TorchJD's default projector solves on G / ||G||_F + 1e-4 I: close to ours on random
    # gradients, visibly off where two gradients nearly cancel (ours is the exact projection).
    jd = torchjd_aggregation()
    g = make_grads("random", 4, 60, 5)
    assert rel_err(agg.aggregate(g, "upgrad"), jd.UPGrad()(g)) <= 1e-2
    g = make_grads("opposed", 4, 60, 6)
    d, w = agg.aggregate(g, "upgrad", return_weights=True)
    assert rel_err(d, jd.UPGrad()(g)) > 1e-3
    assert (g @ d).min() >= -1e-12 * g.norm(dim=1).max() ** 2  # ours conflicts with no task


@SETTINGS
@given(grad_cases)
def test_upgrad_projections_satisfy_the_kkt_conditions(case):
    g = make_grads(*case)
    G = agg.gram(g)
    T = G.shape[0]
    tol = 1e-9 * np.abs(G).max()
    for i in range(T):
        e = np.eye(T)[i]
        v = dual_cone_weights(G, e)
        Gv = G @ v
        # min v^T G v s.t. v >= e_i: v >= e_i, G v >= 0, (v - e_i) . G v = 0
        assert np.all(v >= e) and np.all(Gv >= -tol) and abs((v - e) @ Gv) <= tol * max(1.0, v.sum())
    d, w = agg.aggregate(g, "upgrad", return_weights=True)
    assert np.all(G @ w >= -tol * max(1.0, w.sum()))  # the update conflicts with no task


def test_upgrad_without_conflicts_is_the_mean_or_the_sum():
    g = make_grads("aligned", 4, 50, 7)  # pairwise cosines > 0
    assert (agg.gram(g) > 0).all()
    _, w = agg.aggregate(g, "upgrad", return_weights=True)
    assert np.allclose(w, 0.25, rtol=0, atol=1e-15)
    _, w = agg.aggregate(g, "upgrad", reduction="sum", return_weights=True)
    assert np.allclose(w, 1.0, rtol=0, atol=1e-15)
    # Two exactly opposed gradients: each projection onto the (orthogonal) dual cone is 0.
    g = torch.tensor([[1.0, 2.0], [-2.0, -4.0]], dtype=torch.float64)
    assert agg.aggregate(g, "upgrad").abs().max() <= 1e-15


# --------------------------------------------------------------------------------------
# FairGrad
# --------------------------------------------------------------------------------------


def fairgrad_residual(G, w, alpha):
    """The equations G w = w^(-1/alpha), relative to the size of their terms."""
    target = w ** (-1.0 / alpha)
    return (np.abs(G @ w - target) / (np.abs(G) @ w + target)).max()


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
def test_fairgrad_matches_torchjd(alpha):
    jd = torchjd_aggregation()
    for T, seed in [(2, 1), (3, 2), (5, 3)]:
        g = make_grads("random", T, 60, seed)
        ours, w = agg.aggregate(g, "fairgrad", alpha=alpha, return_weights=True)
        theirs = jd.FairGrad(alpha=alpha)(g)  # scipy least_squares from w = 1/T
        assert np.all(w > 0) and rel_err(ours, theirs) <= 1e-6, (alpha, T)
        assert fairgrad_residual(agg.gram(g), w, alpha) <= 1e-12


@SETTINGS
@given(grad_cases, st.sampled_from([0.01, 0.3, 1.0, 2.0, 10.0]))
def test_fairgrad_solves_its_equations_or_finds_no_solution(case, alpha):
    g = make_grads(*case)
    G = agg.gram(g)
    w = agg.make_method("fairgrad", alpha=alpha).weights(G)
    assert np.isfinite(w).all() and np.all(w >= 0)
    live = w > 0
    if live.any():  # solved: the equations hold on the tasks it weighs; the others are zero
        Gl = G[np.ix_(live, live)]
        assert fairgrad_residual(Gl, w[live], alpha) <= 1e-10
        assert np.all(np.diag(G)[~live] <= 1e-30 * np.diag(G).max())
    if case[0] in ("random", "aligned") and case[1] <= case[2]:  # full rank, no zero: a solution exists
        assert live.all()


def test_fairgrad_special_cases():
    rng = np.random.default_rng(0)
    g = torch.from_numpy(rng.standard_normal((4, 30)))
    G = agg.gram(g)
    # alpha = 1: proportional fairness, Nash-MTL's bargaining equations (unnormalized)
    w1 = agg.make_method("fairgrad", alpha=1.0).weights(G)
    assert np.allclose(w1, agg.make_method("nash", normalize=False).weights(G), rtol=1e-10, atol=0)
    # orthogonal gradients: w_i = ||g_i||^(-2 alpha / (1 + alpha))
    D = np.diag([0.5, 2.0, 9.0])
    for alpha in (0.3, 2.0, 7.0):
        want = np.diag(D) ** (-alpha / (1 + alpha))
        assert np.allclose(agg.make_method("fairgrad", alpha=alpha).weights(D), want, rtol=1e-12, atol=0)
    # alpha -> 0: the plain sum (w -> 1); larger alpha: more equal utilities g_i . d (max-min fairness)
    Gs = G / np.linalg.norm(G)
    w = agg.make_method("fairgrad", alpha=0.01).weights(Gs)
    assert np.abs(w - 1).max() <= 0.05
    spread = []
    for alpha in (0.5, 1.0, 2.0, 5.0, 10.0):
        u = Gs @ agg.make_method("fairgrad", alpha=alpha).weights(Gs)
        spread.append(u.max() / u.min())
    assert spread == sorted(spread, reverse=True) and spread[-1] < 1.5 < spread[0]
    # Pareto-stationary (0 in the hull): no solution, weights 0; a zero gradient gets weight 0
    g = torch.tensor([[1.0, 2.0], [-1.0, -2.0], [3.0, 1.0]], dtype=torch.float64)
    assert np.all(agg.aggregate(g, "fairgrad", return_weights=True)[1] == 0)
    g = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, -1.0]], dtype=torch.float64)
    w = agg.aggregate(g, "fairgrad", return_weights=True)[1]
    assert w[1] == 0 and np.all(w[[0, 2]] > 0)
    assert fairgrad_residual(agg.gram(g)[np.ix_([0, 2], [0, 2])], w[[0, 2]], 2.0) <= 1e-12


# --------------------------------------------------------------------------------------
# FAMO
# --------------------------------------------------------------------------------------


class OfficialFAMO:
    """The official FAMO update (Liu et al. 2023, Algorithm 1 with Adam on the logits, as
    its code runs it), in float64 torch: the weighted loss sum_i z_i log(L_i + 1e-8) / c,
    c = sum_i z_i / (L_i + 1e-8); after the step, the logits' gradient is J_softmax^T delta."""

    def __init__(self, T, lr, gamma):
        self.w = torch.zeros(T, dtype=torch.float64, requires_grad=True)
        self.opt = torch.optim.Adam([self.w], lr=lr, weight_decay=gamma)

    def loss_weights(self, losses):
        L = torch.tensor(losses, dtype=torch.float64, requires_grad=True)
        self.prev = L.detach()
        z = torch.softmax(self.w, -1)
        D = L + 1e-8
        c = (z / D).sum().detach()
        (torch.log(D) * z / c).sum().backward()
        return L.grad.numpy()  # d total / d L_i: the weights of the losses

    def update(self, losses):
        delta = torch.log(self.prev + 1e-8) - torch.log(torch.tensor(losses, dtype=torch.float64) + 1e-8)
        d = torch.autograd.grad(torch.softmax(self.w, -1), self.w, grad_outputs=delta)[0]
        self.opt.zero_grad()
        self.w.grad = d
        self.opt.step()


def fabricated_losses(steps, T, seed):
    """Decreasing losses at different rates, with noise; one task stalls."""
    rng = np.random.default_rng(seed)
    rates = rng.uniform(0.0, 0.1, T)
    rates[0] = 0.0
    return [list(np.exp(-rates * t) * rng.uniform(0.8, 1.2, T) * rng.uniform(0.5, 3, T)) for t in range(steps)]


@pytest.mark.parametrize("lr,gamma", [(0.025, 0.01), (0.3, 0.0)])
def test_famo_matches_the_official_update(lr, gamma):
    sequence = fabricated_losses(30, 3, 1)
    theirs = OfficialFAMO(3, lr, gamma)
    ours = agg.make_method("famo", lr=lr, gamma=gamma)
    for t, losses in enumerate(sequence):
        if t > 0:
            theirs.update(losses)  # their extra forward; our next call brings the same losses
        w_theirs = theirs.loss_weights(losses)
        w = ours.loss_weights(losses)
        assert np.allclose(w, w_theirs, rtol=1e-12, atol=0), t
        assert np.allclose(ours.logits, theirs.w.detach().numpy(), rtol=1e-10, atol=1e-14), t
        assert abs(w.sum() - 1) <= 1e-12
    assert np.abs(ours.logits).max() > 1e-2  # the logits did move


def test_famo_raises_the_weight_of_a_stalled_task():
    famo = agg.make_method("famo", lr=0.1)
    for t in range(40):  # task 0 stalls, tasks 1 and 2 keep decreasing
        famo.loss_weights([1.0, np.exp(-0.05 * t), np.exp(-0.05 * t)])
    z = famo.weights(np.eye(3))
    assert z[0] > 0.5 and np.isclose(z[1], z[2]) and np.isclose(z.sum(), 1.0)


def test_famo_missing_tasks_zero_and_negative_losses():
    famo = agg.make_method("famo", lr=0.1)
    famo.loss_weights([1.0, 2.0, None])
    logits = famo.logits.copy()
    w = famo.loss_weights([0.5, None, 3.0])  # only task 0 has a loss in both calls
    z = np.exp(logits) / np.exp(logits).sum()
    delta = np.array([np.log((1.0 + 1e-8) / (0.5 + 1e-8)), 0.0, 0.0])
    grad = z * (delta - z @ delta)
    assert np.allclose(famo.logits, logits - 0.1 * np.sign(grad), atol=1e-9)  # Adam's first step
    assert w[1] == 0 and np.isclose(w.sum(), 1.0) and np.all(w[[0, 2]] > 0)
    w = famo.loss_weights([0.0, 0.0, 0.0])  # zero losses: finite (L + 1e-8)
    assert np.isfinite(w).all() and np.isfinite(famo.logits).all() and np.isclose(w.sum(), 1.0)
    assert np.all(famo.loss_weights([None, None, None]) == 0)
    with pytest.raises(ValueError, match="famo weighs log-losses and needs losses >= 0; task 1's is -0.5"):
        famo.loss_weights([1.0, -0.5, 1.0])
    with pytest.raises(ValueError, match="famo was set up for 3 tasks, got 2 losses"):
        famo.loss_weights([1.0, 1.0])


def test_famo_needs_no_task_gradients():
    from test_aggregation import tiny_problem

    shared, heads, losses = tiny_problem()
    mtb = agg.MultiTaskBackward(list(shared.parameters()), [list(h.parameters()) for h in heads], "famo",
                                num_tasks=3)
    assert not hasattr(mtb, "buffer")  # no (T, P) buffer: one backward of the weighted sum
    for _ in range(3):
        ls = losses()
        want_w = agg.make_method("famo")
        want_w.load_state_dict(json.loads(json.dumps(mtb.method.state_dict())))
        w = want_w.loss_weights([float(l.detach()) for l in ls])
        total = sum(float(wi) * l for wi, l in zip(w, ls))
        want = torch.autograd.grad(total, list(shared.parameters()), retain_graph=True)
        for p in shared.parameters():
            p.grad = None  # a loss-weighting backward accumulates, as loss.backward() does
        stats = mtb.backward(ls)
        assert np.array_equal(stats.weights.numpy(), w)
        for p, gw in zip(shared.parameters(), want):
            assert torch.allclose(p.grad, gw, atol=1e-7)


# --------------------------------------------------------------------------------------
# All three: errors, state, degenerate gradients
# --------------------------------------------------------------------------------------


def test_argument_errors():
    for name, options, message in [("upgrad", {"reduction": "avg"}, "reduction must be"),
                                   ("fairgrad", {"alpha": 0.0}, "alpha must be >= 0.01 and <= 10"),
                                   ("fairgrad", {"alpha": 11.0}, "alpha must be >= 0.01 and <= 10"),
                                   ("fairgrad", {"alpha": "two"}, "alpha must be"),
                                   ("famo", {"lr": 0.0}, "lr must be > 0"),
                                   ("famo", {"gamma": -1.0}, "gamma must be >= 0")]:
        with pytest.raises(ValueError, match=message):
            agg.make_method(name, **options)
    with pytest.raises(ValueError, match=r"unknown option\(s\) for 'famo': \['alpha'\]"):
        agg.make_method("famo", alpha=1.0)
    with pytest.raises(ValueError, match="fairgrad_alpha must be"):
        TrainConfig(combine="fairgrad", fairgrad_alpha=-1.0)


@pytest.mark.parametrize("method", NEW)
def test_state_round_trips_mid_run(method):
    g = make_grads("random", 3, 30, 2)
    sequence = fabricated_losses(8, 3, 3)
    a = agg.make_method(method)
    for losses in sequence[:4]:
        a.loss_weights(losses)
        agg.aggregate(g, a)
    b = agg.make_method(method)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for losses in sequence[4:]:
        assert np.array_equal(a.loss_weights(losses), b.loss_weights(losses))
        assert np.array_equal(agg.aggregate(g, a, return_weights=True)[1], agg.aggregate(g, b, return_weights=True)[1])
    assert json.dumps(a.state_dict()) == json.dumps(b.state_dict())


@pytest.mark.parametrize("method", NEW)
@pytest.mark.parametrize("kind", KINDS)
def test_degenerate_gradients_give_finite_weights(method, kind):
    for T in (2, 3, 7):
        g = make_grads(kind, T, 20, T)
        d, w = agg.aggregate(g, method, return_weights=True)
        assert torch.isfinite(d).all() and np.isfinite(w).all()
    for g in (torch.zeros(3, 10), torch.ones(3, 10), torch.tensor([[1.0, 0.0], [-1.0, 0.0]]),
              torch.tensor([[1.0, 1.0], [2.0, 2.0], [0.0, 0.0]])):  # all zero, equal, opposed, colinear
        d, w = agg.aggregate(g, method, return_weights=True)
        assert torch.isfinite(d).all() and np.isfinite(w).all()


# --------------------------------------------------------------------------------------
# Training: flags, the checkpoint, and an exact resume
# --------------------------------------------------------------------------------------


def test_new_options_are_flags_saved_in_the_checkpoint(tmp_path, tiny_model_dir, data_dir):
    out = tmp_path / "run"
    args = ["--model", str(tiny_model_dir), "--data-dir", str(data_dir), "--out", str(out),
            "--max-steps", "1", "--train-limit", "16", "--eval-limit", "16", "--batch-size", "4",
            "--max-length", "32", "--combine", "famo", "--famo-lr", "0.05", "--famo-gamma", "0.001",
            "--fairgrad-alpha", "1.5", "--upgrad-reduction", "mean", "--no-progress", "--no-predict"]
    result = CliRunner().invoke(train_cmd, args)
    assert result.exit_code == 0, result.output
    saved = ckpt.read_meta(out / "last")["train"]
    assert (saved["famo_lr"], saved["famo_gamma"], saved["fairgrad_alpha"], saved["upgrad_reduction"]) == \
        (0.05, 0.001, 1.5, "mean")
    assert TrainConfig.from_dict(saved).make_method().options == {"lr": 0.05, "gamma": 0.001}
    assert TrainConfig(combine="upgrad").make_method().options == {"reduction": "sum"}  # our training default
    assert TrainConfig(combine="fairgrad").make_method().options == {"alpha": 2.0}
    bad = CliRunner().invoke(train_cmd, args[:-2] + ["--fairgrad-alpha", "0", "--no-progress"])
    assert bad.exit_code == 2 and "alpha" in bad.output



@pytest.mark.parametrize("method,options", [("upgrad", {}), ("fairgrad", {"fairgrad_alpha": 1.5}),
                                            ("famo", {"famo_lr": 0.2})])
def test_training_resumes_exactly(tmp_path, tiny_model_dir, data_dir, monkeypatch, method, options):
    settings = dict(max_steps=4, save_every=2, combine=method, predict=False, log_every=1, **options)
    whole = tiny_config(tmp_path / "whole", tiny_model_dir, data_dir, **settings)
    train(whole)
    cut = tiny_config(tmp_path / "cut", tiny_model_dir, data_dir, **settings)
    stop_after_first_checkpoint(cut, monkeypatch)  # the run dies right after it
    state = json.loads((Path(cut.out) / "last" / ckpt.STATE_JSON).read_text())
    assert state["step"] == 2 and state["aggregation"]["method"] == method
    train(cut, resume=True)

    assert_same_end(whole.out, cut.out)  # the same weights and the same method state
    logged = [json.loads(line) for line in (Path(whole.out) / "metrics.jsonl").read_text().splitlines()]
    weights = [r["aggregation"]["weights"] for r in logged if r["type"] == "train"]
    assert len(weights) == 4 and np.isfinite(weights).all()
    if method == "famo":  # the logits moved: the weights are not the first step's
        saved = json.loads((Path(whole.out) / "last" / ckpt.STATE_JSON).read_text())["aggregation"]
        assert saved["state"]["steps"] == 3 and weights[-1] != weights[0]
