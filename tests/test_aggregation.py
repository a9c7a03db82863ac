"""Multi-task gradient methods (mtbert.mtl.aggregation): each Gram-space method against a
direct float64 torch implementation on the (T, P) vectors written from its paper; the
properties the papers state; LibMTL where the algorithms are the same (and pinned
differences where they are not); the engine's native and torch paths; the wrapper."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

import numpy as np
import pytest
import scipy.optimize
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mtbert import _native
import mtbert.aggregation as agg
from mtbert.mtl.methods import cagrad as cagrad_method
from mtbert.mtl.pcgrad import pcgrad, pcgrad_naive

TOL = 1e-5
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def rel_err(got, want, scale: float = 0.0) -> float:
    """||got - want|| / max(||want||, scale). ``scale``: the size of the inputs, for
    results that are (nearly) zero, like MGDA's on opposed gradients."""
    got = torch.as_tensor(np.asarray(got), dtype=torch.float64)
    want = torch.as_tensor(np.asarray(want), dtype=torch.float64)
    den = max(want.norm().item(), scale)
    num = (got - want).norm().item()
    return num / den if den > 0 else num


def input_scale(g: torch.Tensor) -> float:
    return g.double().norm(dim=1).max().item()


# --------------------------------------------------------------------------------------
# Gradients: random, aligned, opposed, parallel, zero and tiny; T from 2 to 16
# --------------------------------------------------------------------------------------

KINDS = ("random", "aligned", "opposed", "parallel", "zero", "tiny")


def make_grads(kind: str, T: int, P: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((T, P))
    if kind == "aligned":  # a common direction plus a little noise
        g = rng.standard_normal(P)[None, :] * rng.uniform(0.5, 2, (T, 1)) + 0.1 * g
    elif kind == "opposed":  # pairs pulling in opposite directions
        g[1::2] = -g[0:-1:2][: len(g[1::2])] * rng.uniform(0.5, 2, (len(g[1::2]), 1)) + 0.01 * g[1::2]
    elif kind == "parallel":  # every task along one direction, either sign
        g = rng.standard_normal(P)[None, :] * rng.choice([-1.0, 1.0], (T, 1)) * rng.uniform(0.5, 2, (T, 1))
    elif kind == "zero":
        g[rng.choice(T, size=max(1, T // 3), replace=False)] = 0.0
    elif kind == "tiny":
        g *= 1e-150  # float64 only: far below float32's range
    return torch.from_numpy(g)


grad_cases = st.tuples(st.sampled_from(KINDS), st.integers(2, 16), st.integers(1, 48), st.integers(0, 2**32 - 1))
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------------------
# Direct implementations on the vectors (float64 torch), from the papers
# --------------------------------------------------------------------------------------


def gradvac_direct(g, order, targets, beta, reduction="sum"):
    """Wang et al. 2021, Algorithm 1, on the vectors; returns (d, new targets, margin):
    margin, the smallest |phi - target| of the decisions, where rounding can flip one."""
    T = g.shape[0]
    targets = targets.clone()
    out = []
    margin = float("inf")
    for i in range(T):
        gi = g[i].clone()
        for j in order[i]:
            j = int(j)
            if j == i:
                continue
            if g[i].norm() > 0:  # a g_i (nearly) cancelled out has no reliable angle
                margin = min(margin, float(gi.norm() / g[i].norm()))
            if gi.norm() == 0 or g[j].norm() == 0:
                continue
            phi = (gi @ g[j] / (gi.norm() * g[j].norm())).clamp(-1, 1)
            t = targets[i, j]
            margin = min(margin, abs(float(phi - t)), abs(1 - float(t)))
            if phi < t < 1:
                gi = gi + g[j] * gi.norm() * (t * (1 - phi**2).sqrt() - phi * (1 - t**2).sqrt()) \
                    / (g[j].norm() * (1 - t**2).sqrt())
            targets[i, j] = (1 - beta) * t + beta * phi
        out.append(gi)
    d = torch.stack(out).sum(0)
    return (d / T if reduction == "mean" else d), targets, margin


def imtl_direct(g):
    """IMTL-G (Liu et al. 2021): alpha_{2:T} = g_1 U^T (D U^T)^{-1}, alpha_1 = 1 - sum.
    Examples whose system is ill-conditioned (its answer undefined) are discarded."""
    u = g / g.norm(dim=1, keepdim=True)
    D = g[0:1] - g[1:]
    U = u[0:1] - u[1:]
    smallest = torch.linalg.svdvals(D @ U.T).min().item()
    assume(U.norm(dim=1).min().item() > 1e-6)  # unit gradients that differ, not by rounding
    assume(smallest > 1e-6 * (D.norm() * U.norm()).item())
    alpha = g[0] @ U.T @ torch.linalg.inv(D @ U.T)
    alpha = torch.cat([1 - alpha.sum(0, keepdim=True), alpha])
    return alpha @ g


def aligned_direct(g, scale="min"):
    """Aligned-MTL (Senushkin et al. 2023): the gradients replaced by sigma U V^T (SVD of
    the (T, P) matrix; singular values with sigma^2 <= sigma_max^2 T eps32 dropped), summed."""
    U, S, Vh = torch.linalg.svd(g, full_matrices=False)
    keep = S**2 > S.max() ** 2 * g.shape[0] * np.finfo(np.float32).eps
    U, S, Vh = U[:, keep], S[keep], Vh[keep]
    ref = {"min": S.min(), "median": (S**2).median().sqrt(), "rmse": (S**2).mean().sqrt()}[scale]
    return (ref * U @ Vh).sum(0), S


def cagrad_direct(g, c, rescale=1):
    """CAGrad (Liu et al. 2021), as the official code writes it, on the vectors."""
    T = g.shape[0]
    g0 = g.mean(0)
    radius = c * g0.norm().item()
    GG = (g @ g.T).numpy()
    b = (g @ g0).numpy()
    if radius == 0:
        d = g0
        x = np.full(T, 1.0 / T)
    else:
        s = GG.diagonal().max()
        x = np.full(T, 1.0 / T)
        for _ in range(5):  # restarts from its own answer: SLSQP stops early on this kink
            res = scipy.optimize.minimize(
                lambda x: (x @ b + radius * np.sqrt(max(x @ GG @ x, 0.0))) / s, x,
                bounds=[(0, 1)] * T, constraints={"type": "eq", "fun": lambda x: 1 - x.sum()},
                method="SLSQP", options={"ftol": 1e-15, "maxiter": 1000})
            x = np.clip(res.x, 0, None)
            x /= x.sum()
        gw = torch.from_numpy(x) @ g
        # A vanishing g_w (0 in the hull) has no direction: d = g0, as ours.
        d = g0 + radius * gw / gw.norm() if gw.norm() > cagrad_method._NO_DIRECTION * input_scale(g) else g0
    return d / {0: 1.0, 1: 1 + c * c, 2: 1 + c}[rescale], x


def pcgrad_decision_margin(g, order) -> float:
    """Smallest |p_i . g_j| / (||p_i|| ||g_j||) over PCGrad's decisions: near 0 a decision
    flips with rounding (as in tests/test_pcgrad.py), and examples there are discarded."""
    T = g.shape[0]
    margin = float("inf")
    for i in range(T):
        p = g[i].clone()
        for j in order[i]:
            d = p @ g[j]
            scale = (p.norm() * g[j].norm()).item()
            margin = min(margin, abs(d.item()) / scale if scale > 0 else float("inf"))
            if d < 0:
                p = p - d / (g[j] @ g[j] + 1e-12) * g[j]
    return margin


# --------------------------------------------------------------------------------------
# Oracle agreement, per method
# --------------------------------------------------------------------------------------


@SETTINGS
@given(grad_cases, st.sampled_from(["mean", "sum"]))
def test_pcgrad_matches_the_pairwise_loop(case, reduction):
    g = make_grads(*case)
    order = agg.make_method("pcgrad", seed=case[3]).draw_orders(g.shape[0])
    assume(pcgrad_decision_margin(g, order) > 1e-9)
    got = agg.aggregate(g, "pcgrad", order=order, reduction=reduction)
    # The oracle loop in float64. Where the projections cancel to 0, the difference is float64
    # rounding of the T-term combination (found by hypothesis: random, T = 16, P = 1: 2.5e-15
    # on inputs of norm 2), so the floor of the relative error is 1e-9 of the input scale.
    want = pcgrad_naive(g.double(), order=order, reduction=reduction)
    assert rel_err(got, want, 1e-9 * input_scale(g)) <= TOL


@SETTINGS
@given(grad_cases, st.floats(0.0, 1.0))
def test_gradvac_matches_the_papers_loop_over_two_steps(case, beta):
    g = make_grads(*case)
    T = g.shape[0]
    method = agg.make_method("gradvac", beta=beta, seed=1)
    targets = torch.zeros(T, T, dtype=torch.float64)
    rng = np.random.default_rng(case[3])
    for step in range(2):  # the second step uses the targets the first one left
        h = g if step == 0 else g + 0.5 * torch.from_numpy(rng.standard_normal(g.shape)) * input_scale(g)
        order = method.draw_orders(T)
        got = agg.aggregate(h, method, order=order)
        want, targets, margin = gradvac_direct(h, order, targets, beta)
        # A g_i cancelled to a relative norm m has its squared norm from the Gram matrix
        # with a relative error of about 1e-16 / m^2: at m = 3e-6 the targets differ by ~1e-6
        # (the earlier per-pair recomputation too). Decisions that close are not compared.
        assume(margin > 1e-4)
        assert rel_err(got, want, input_scale(h)) <= TOL
        assert np.allclose(method.targets, targets.numpy(), atol=1e-9)


@SETTINGS
@given(grad_cases)
def test_mgda_is_the_min_norm_point_of_the_hull(case):
    """Sener & Koltun 2018: d = sum w_i g_i, w on the simplex, with g_i . d >= ||d||^2 for
    every i (which makes d the min-norm point: for the optimum d*, ||d - d*||^2 <= 2 delta)."""
    g = make_grads(*case)
    d, w = agg.aggregate(g, "mgda", return_weights=True)
    scale = input_scale(g)
    assert np.all(w >= 0) and abs(w.sum() - 1) <= 1e-12
    assert rel_err(d, torch.from_numpy(w) @ g, scale) <= 1e-12
    delta = 1e-11 * scale**2
    assert torch.all(g @ d >= d @ d - delta), (g @ d - d @ d).min()


@SETTINGS
@given(grad_cases, st.one_of(st.just(0.0), st.floats(1e-3, 2.0)), st.sampled_from([0, 1, 2]))
def test_cagrad_matches_the_official_form_and_is_optimal(case, c, rescale):
    g = make_grads(*case)
    got, w = agg.aggregate(g, "cagrad", c=c, rescale=rescale, return_weights=True)
    want, x = cagrad_direct(g, c, rescale)
    scale = input_scale(g)
    # Optimality on the vectors (the paper's primal): ||d - g0|| <= c ||g0|| and
    # min_i g_i . d reaches the dual value g_x . g0 + c ||g0|| ||g_x||.
    g0 = g.mean(0)
    d = got.double() * {0: 1.0, 1: 1 + c * c, 2: 1 + c}[rescale]
    assert (d - g0).norm() <= c * g0.norm() * (1 + 1e-9) + 1e-12 * scale
    gw = torch.from_numpy(x) @ g
    # Near the threshold below which g_w counts as 0, the two solvers may fall either side.
    assume(not 1e-8 * scale < gw.norm() < 1e-4 * scale)
    if c > 0 and gw.norm() > 1e-4 * scale:
        dual = gw @ g0 + c * g0.norm() * gw.norm()
        assert (g @ d).min() >= dual - 1e-6 * scale**2
    # Ours is never less optimal than the oracle's SLSQP; where SLSQP stopped early on the
    # kink of the objective (its own duality gap is visible), equality is not expected.
    F = lambda v: float(torch.from_numpy(v) @ (g @ g0) + c * g0.norm() * (torch.from_numpy(v) @ g).norm())
    x_ours = w * {0: 1.0, 1: 1 + c * c, 2: 1 + c}[rescale] - 1.0 / len(w)
    if c > 0 and x_ours.sum() > 0:
        assert F(x_ours / x_ours.sum()) <= F(x) + 1e-12 * scale**2
    want_d = want.double() * {0: 1.0, 1: 1 + c * c, 2: 1 + c}[rescale]
    oracle_gap = float(gw @ want_d - (g @ want_d).min()) if gw.norm() > 1e-4 * scale else 0.0
    assume(oracle_gap <= 1e-9 * scale**2)
    assert rel_err(got, want, scale) <= TOL  # d can be 0 (Pareto-stationary): input scale


@SETTINGS
@given(grad_cases)
def test_imtl_matches_the_closed_form(case):
    g = make_grads(*case)
    assume(bool((g.norm(dim=1) > 0).all()))
    want = imtl_direct(g)
    got, w = agg.aggregate(g, "imtl", return_weights=True)
    assert abs(w.sum() - 1) <= 1e-9
    assert rel_err(got, want, input_scale(g)) <= TOL
    # Impartial: equal projections of d on every unit gradient.
    proj = (g / g.norm(dim=1, keepdim=True)) @ got
    assert (proj.max() - proj.min()).abs() <= 1e-6 * input_scale(g)


@SETTINGS
@given(grad_cases, st.booleans())
def test_nash_solves_the_bargaining_equations(case, normalize):
    """Navon et al. 2022: alpha_i (g_i . d) = 1 (G normalized by its Frobenius norm when
    ``normalize``), with d = sum alpha_i g_i, alpha > 0; checked on the vectors."""
    g = make_grads(*case)
    d, w = agg.aggregate(g, "nash", normalize=normalize, return_weights=True)
    G = g @ g.T
    m = G.abs().max().item()
    s = m * torch.linalg.norm(G / m).item() if normalize and m > 0 else 1.0  # safe from underflow
    live = g.norm(dim=1) > 0
    mgda = agg.aggregate(g[live], "mgda") if live.any() else None
    if mgda is None or mgda.norm() <= 1e-9 * input_scale(g):
        assert np.all(w == 0)  # no common ascent direction: the disagreement point
        return
    assume(mgda.norm() > 1e-3 * input_scale(g))  # well inside: the solution is well-conditioned
    assert np.all(w[live.numpy()] > 0) and np.all(w[~live.numpy()] == 0)
    a = torch.from_numpy(w[live.numpy()])
    assert torch.allclose(a * (g[live] @ d) / s, torch.ones_like(a), atol=1e-6)


@SETTINGS
@given(grad_cases, st.sampled_from(["min", "median", "rmse"]))
def test_aligned_matches_the_svd(case, scale):
    g = make_grads(*case)
    want, S = aligned_direct(g, scale)
    # Singular values at the rank cut are noise: skip the examples that sit on it.
    cut = S.max() ** 2 * g.shape[0] * np.finfo(np.float32).eps
    assume(bool(((S**2 - cut).abs() > 0.5 * cut).all()))
    got = agg.aggregate(g, "aligned", scale=scale)
    assert rel_err(got, want, 1e-9 * input_scale(g)) <= TOL


@SETTINGS
@given(grad_cases)
def test_baselines(case):
    g = make_grads(*case)
    assert rel_err(agg.aggregate(g, "sum"), g.sum(0)) <= 1e-12
    assert rel_err(agg.aggregate(g, "mean"), g.mean(0)) <= 1e-12


# --------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [2, 3, 8])
def test_cagrad_with_c_zero_is_the_mean(T):
    g = make_grads("random", T, 100, T)
    for rescale in (0, 1, 2):
        assert rel_err(agg.aggregate(g, "cagrad", c=0.0, rescale=rescale), g.mean(0)) <= 1e-12


def test_pcgrad_without_conflicts_is_the_sum():
    g = torch.rand(5, 300, dtype=torch.float64) + 0.1  # all positive: no conflicts
    assert rel_err(agg.aggregate(g, "pcgrad", reduction="sum", seed=0), g.sum(0)) <= 1e-12
    g32 = g.float()
    assert rel_err(agg.aggregate(g32, "pcgrad", reduction="sum", seed=0), g32.double().sum(0)) <= 1e-6


def test_mgda_on_two_tasks_is_the_closed_form():
    g = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    # min ||a g1 + (1-a) g2||: a = 4/5.
    d, w = agg.aggregate(g, "mgda", return_weights=True)
    assert np.allclose(w, [0.8, 0.2]) and torch.allclose(d, torch.tensor([0.8, 0.4], dtype=torch.float64))


def test_pcgrad_method_equals_the_pcgrad_function():
    g = make_grads("random", 4, 5000, 3).float()
    order = agg.make_method("pcgrad", seed=5).draw_orders(4)
    for reduction in ("mean", "sum"):
        got = agg.aggregate(g, "pcgrad", order=order, reduction=reduction)
        # Same passes; the T x T algebra (numpy here, Rust there) may round a weight's last
        # bit differently, so a rare element differs by one float32 ulp.
        assert rel_err(got, pcgrad(g, order=order, reduction=reduction)) <= 1e-12


@pytest.mark.parametrize("method", agg.METHODS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_is_a_clear_error(method, bad):
    for dtype in (torch.float32, torch.float64):
        g = make_grads("random", 3, 50, 1).to(dtype)
        g[1, 7] = bad
        with pytest.raises(ValueError, match="non-finite value .* at task 1, index 7"):
            agg.aggregate(g, method)


@pytest.mark.parametrize("method", agg.METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_every_method_gives_finite_output(method, kind):
    for T in (2, 3, 16):
        g = make_grads(kind, T, 40, T)
        d, w = agg.aggregate(g, method, return_weights=True)
        assert torch.isfinite(d).all() and np.isfinite(w).all() and d.shape == (40,)
        if kind != "tiny":
            d32 = agg.aggregate(g.float(), method)
            assert torch.isfinite(d32).all() and d32.dtype == torch.float32


def test_argument_errors():
    g = make_grads("random", 3, 10, 0)
    with pytest.raises(ValueError, match="unknown method 'adam'"):
        agg.aggregate(g, "adam")
    with pytest.raises(ValueError, match=r"unknown option\(s\) for 'cagrad': \['beta'\]"):
        agg.aggregate(g, "cagrad", beta=0.1)
    for name, options, message in [("cagrad", {"c": -1}, "c must be >= 0"),
                                   ("cagrad", {"rescale": 3}, "rescale must be"),
                                   ("gradvac", {"beta": 2}, "beta must be >= 0 and <= 1"),
                                   ("pcgrad", {"reduction": "avg"}, "reduction must be"),
                                   ("aligned", {"scale": "max"}, "scale must be"),
                                   ("dwa", {"temperature": 0}, "temperature must be"),
                                   ("dwa", {"period": 0}, "period must be")]:
        with pytest.raises(ValueError, match=message):
            agg.make_method(name, **options)
    with pytest.raises(ValueError, match="2 dimensions"):
        agg.aggregate(g[0], "mean")
    with pytest.raises(ValueError, match=r"weights must have shape \(3,\)"):
        agg.combine(g, [1.0, 2.0])
    with pytest.raises(ValueError, match=r"weights\[1\] = nan is not finite"):
        agg.combine(g, [1.0, float("nan"), 2.0])


# --------------------------------------------------------------------------------------
# The engine: native (Rust) and torch paths
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 3, 16])
def test_native_and_torch_engines_agree(T):
    g = make_grads("random", T, 70_001, T).float()
    G_native = _native.gram(g.numpy())
    G_exact = (g.double() @ g.double().T).numpy()
    assert np.allclose(G_native, G_exact, rtol=1e-6, atol=1e-6 * np.sqrt(np.outer(*[G_exact.diagonal()] * 2)).max())
    assert np.array_equal(G_native, _native.gram(g.numpy(), num_threads=1))  # thread-independent
    w = np.linspace(-1, 2, T)
    want = torch.from_numpy(w) @ g.double()
    native = agg.combine(g, w)
    torch_path = agg.combine(g.double(), w)  # a float64 tensor takes the torch path
    assert rel_err(native, want) <= 1e-7 and rel_err(torch_path, want) <= 1e-14
    out = torch.empty(g.shape[1])
    assert agg.combine(g, w, out=out) is out and torch.equal(out, native)
    # The native path equals _native.combine exactly; the weights reach it as float64.
    assert np.array_equal(native.numpy(), _native.combine(g.numpy(), w))


def test_gradient_methods_agree_between_native_float32_and_float64():
    g = make_grads("random", 3, 20_000, 7)
    for method in agg.GRADIENT_METHODS:
        options = {"seed": 3} if method in ("pcgrad", "gradvac") else {}
        d64 = agg.aggregate(g, method, **options)
        d32 = agg.aggregate(g.float(), method, **options)
        assert rel_err(d32, d64) <= 1e-5, method


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_path_matches_cpu():
    g = make_grads("random", 3, 100_000, 9).float()
    for method in agg.GRADIENT_METHODS:
        options = {"seed": 3} if method in ("pcgrad", "gradvac") else {}
        cpu = agg.aggregate(g, method, **options)
        gpu = agg.aggregate(g.cuda(), method, **options)
        assert gpu.device.type == "cuda" and rel_err(gpu.cpu(), cpu) <= 1e-5, method


# --------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", agg.METHODS)
def test_state_round_trips_through_json(method):
    import json

    g = make_grads("random", 3, 30, 2)
    a = agg.make_method(method)
    for _ in range(3):
        agg.aggregate(g, a)
        a.loss_weights([1.0, 2.0, 3.0])
    b = agg.make_method(method)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    _, wa = agg.aggregate(g, a, return_weights=True)
    _, wb = agg.aggregate(g, b, return_weights=True)
    assert np.array_equal(wa, wb)
    assert np.array_equal(a.loss_weights([1.0, 1.5, 2.0]), b.loss_weights([1.0, 1.5, 2.0]))


def test_dwa_follows_the_loss_ratios():
    dwa = agg.make_method("dwa", temperature=2.0, period=2)
    for losses in ([1, 1, 1], [1, 1, 1], [2, 1, 1], [2, 1, 1]):
        assert np.array_equal(dwa.loss_weights(losses), np.ones(3))  # two periods first
    # Periods' means: [1, 1, 1] then [2, 1, 1]: r = [2, 1, 1].
    z = np.array([2, 1, 1]) / 2.0
    assert np.allclose(dwa.loss_weights([1, 1, 1]), 3 * np.exp(z) / np.exp(z).sum())
    # A task sampled out for a whole period (None) keeps ratio 1; its mean ignores absences.
    dwa = agg.make_method("dwa", period=2)
    for losses in ([1, 1, None], [1, 3, None], [2, 1, None], [2, 3, None]):
        dwa.loss_weights(losses)
    assert dwa.history == [[1.0, 2.0, None], [2.0, 2.0, None]]
    z = np.array([2, 1, 1]) / 2.0
    assert np.allclose(dwa.loss_weights([1, 1, 1]), 3 * np.exp(z) / np.exp(z).sum())


# --------------------------------------------------------------------------------------
# The training wrapper
# --------------------------------------------------------------------------------------


def tiny_problem(seed=0):
    torch.manual_seed(seed)
    shared = torch.nn.Linear(4, 3)
    heads = [torch.nn.Linear(3, 1) for _ in range(3)]
    x = torch.randn(8, 4)
    targets = torch.randn(3, 8)

    def losses():
        h = torch.tanh(shared(x))
        return [((head(h).squeeze(1) - t) ** 2).mean() for head, t in zip(heads, targets)]

    return shared, heads, losses


@pytest.mark.parametrize("method", agg.METHODS)
def test_wrapper_sets_the_aggregated_gradient(method):
    shared, heads, losses = tiny_problem()
    mtb = agg.MultiTaskBackward(list(shared.parameters()), [list(h.parameters()) for h in heads], method)
    ls = losses()
    per_task = [torch.autograd.grad(l, list(shared.parameters()), retain_graph=True) for l in ls]
    g = torch.stack([torch.cat([x.reshape(-1) for x in gs]) for gs in per_task])  # (T, P)
    head_grads = [torch.autograd.grad(l, list(h.parameters()), retain_graph=True) for l, h in zip(ls, heads)]
    twin = agg.make_method(method)  # same seed-free state: compare the weights it chose
    stats = mtb.backward(ls)
    w = stats.weights.numpy()
    assert stats.method == method and w.shape == (3,)
    got = torch.cat([p.grad.reshape(-1) for p in shared.parameters()])
    assert rel_err(got, torch.from_numpy(w).float() @ g) <= 1e-5
    scale = 1.0 if agg.make_method(method).gradient_based else None
    for h, hg, wi in zip(heads, head_grads, w):
        for p, want in zip(h.parameters(), hg):
            factor = 1.0 if scale else wi  # gradient methods: heads get their own gradient
            assert torch.allclose(p.grad, factor * want, atol=1e-6)
    if agg.make_method(method).gradient_based:
        assert stats.cosine.shape == (3, 3) and "cosine" in stats.to_log()
        if method in ("sum", "mean", "mgda", "imtl", "nash", "aligned", "cagrad"):
            assert np.allclose(w, agg.aggregate(g, twin, return_weights=True)[1], atol=1e-6)
    assert "weights" in stats.to_log()


@pytest.mark.parametrize("method", ["mgda", "cagrad"])
def test_wrapper_sync_sees_the_buffer_before_the_method(method):
    # The data-parallel hook: sync gets the (T, P) buffer of per-task gradients once it is
    # full and may change it in place (an all-reduce sums it over ranks); the method's
    # weights and the update come from the synced buffer. Here sync doubles task 0's row.
    shared, heads, losses = tiny_problem()
    seen = []

    def sync(buffer):
        seen.append(buffer.clone())
        buffer[0] *= 2.0

    mtb = agg.MultiTaskBackward(list(shared.parameters()), [list(h.parameters()) for h in heads], method,
                                sync=sync)
    ls = losses()
    per_task = [torch.autograd.grad(l, list(shared.parameters()), retain_graph=True) for l in ls]
    g = torch.stack([torch.cat([x.reshape(-1) for x in gs]) for gs in per_task])  # (T, P)
    stats = mtb.backward(ls)
    assert len(seen) == 1 and torch.allclose(seen[0], g, atol=1e-7)
    synced = g.clone()
    synced[0] *= 2.0
    want, w = agg.aggregate(synced, method, return_weights=True)
    assert np.allclose(stats.weights.numpy(), w, atol=1e-6)
    got = torch.cat([p.grad.reshape(-1) for p in shared.parameters()])
    assert rel_err(got, want) <= 1e-5
    assert rel_err(want, agg.aggregate(g, method)) > 1e-3  # the sync did change the update


def test_weighted_loss_is_for_loss_weighting_methods():
    shared, heads, losses = tiny_problem()
    params = [list(h.parameters()) for h in heads]
    ls = losses()
    total, stats = agg.MultiTaskBackward(list(shared.parameters()), params, "rlw").weighted_loss(ls)
    w = stats.weights.numpy()
    assert torch.allclose(total, sum(float(wi) * l for wi, l in zip(w, ls)))
    with pytest.raises(ValueError, match="mgda combines per-task gradients"):
        agg.MultiTaskBackward(list(shared.parameters()), params, "mgda").weighted_loss(ls)


def test_uw_trains_its_log_variances():
    shared, heads, losses = tiny_problem()
    mtb = agg.MultiTaskBackward(list(shared.parameters()), [list(h.parameters()) for h in heads], "uw")
    (s,) = mtb.parameters()
    ls = losses()
    mtb.backward(ls)
    # d/ds_i (exp(-s_i) L_i / 2 + s_i / 2) = (1 - L_i exp(-s_i)) / 2 at s = 0.
    assert torch.allclose(s.grad, torch.tensor([(1 - l.item()) / 2 for l in ls]), atol=1e-6)


# --------------------------------------------------------------------------------------
# LibMTL (test-only oracle): same algorithms agree, deliberate differences are pinned
# --------------------------------------------------------------------------------------


def libmtl_weighting():
    """LibMTL.weighting without the package __init__ (it imports a torchvision module
    that no longer exists): a bare LibMTL package whose __path__ is the installed folder."""
    if "LibMTL" not in sys.modules:
        spec = importlib.util.find_spec("LibMTL")
        if spec is None or not spec.submodule_search_locations:
            if IN_CI:
                pytest.fail("LibMTL is a dev dependency: pip install --no-deps LibMTL")
            pytest.skip("LibMTL is not installed (pip install --no-deps LibMTL)")
        package = types.ModuleType("LibMTL")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["LibMTL"] = package
    return importlib.import_module("LibMTL.weighting")


def run_libmtl(name: str, g: torch.Tensor, shuffles=None, setup=None, **kwargs):
    """Runs LibMTL's weighting ``name`` on a linear model whose task gradients are exactly
    the rows of ``g`` (L_i = g_i . theta); returns the shared gradient it sets and its
    returned weights. ``shuffles``: the rows its random.shuffle calls must produce."""
    weighting = libmtl_weighting()
    cls = getattr(weighting, name)
    T, P = g.shape

    class Harness(cls):
        def __init__(self):
            super().__init__()
            self.task_num, self.device, self.rep_grad = T, torch.device("cpu"), False
            self.theta = torch.nn.Parameter(torch.zeros(P))
            self.epoch = 0

        def get_share_params(self):
            return [self.theta]

        def zero_grad_share_params(self):
            self.theta.grad = torch.zeros_like(self.theta)

    h = Harness()
    h.init_param()
    if setup:
        setup(h)
    module = sys.modules[cls.__module__]
    saved = getattr(module, "random", None)
    if shuffles is not None:
        queue = [list(map(int, row)) for row in shuffles]

        def shuffle(items):
            row = queue.pop(0)
            assert sorted(row) == sorted(items)
            items[:] = row

        module.random = types.SimpleNamespace(shuffle=shuffle)
    try:
        losses = g.float() @ h.theta  # (T,): each L_i's gradient is g_i
        w = h.backward(losses, **kwargs)
    finally:
        if shuffles is not None:
            module.random = saved
    return h.theta.grad.detach().double(), np.asarray(w, dtype=np.float64), h


def test_libmtl_pcgrad_agrees_given_the_same_orders():
    g = make_grads("random", 4, 200, 11).float().double()
    order = agg.make_method("pcgrad", seed=2).draw_orders(4)
    theirs, _, _ = run_libmtl("PCGrad", g, shuffles=order)
    ours = agg.aggregate(g, "pcgrad", order=order, reduction="sum", eps=0.0)
    assert rel_err(ours, theirs) <= 1e-5


def test_libmtl_gradvac_agrees_on_the_first_step_and_pins_the_target_update():
    g = make_grads("random", 3, 200, 12).float().double()
    order = agg.make_method("gradvac", seed=2).draw_orders(3)
    beta = 0.5
    others = [[j for j in row if j != i] for i, row in enumerate(order)]
    theirs, _, h = run_libmtl("GradVac", g, shuffles=others, beta=beta)
    method = agg.make_method("gradvac", beta=beta)
    ours = agg.aggregate(g, method, order=order)
    assert rel_err(ours, theirs) <= 1e-5  # targets start at 0: the same corrections
    # Deliberate difference: the paper (and we) move every pair's target; LibMTL only
    # the pairs it corrected (phi < target), leaving the others at 0.
    cos = agg.AggregationStats.build("gradvac", np.ones(3), agg.gram(g)).cosine.numpy()
    corrected = h.rho_T.numpy() != 0
    assert np.allclose(method.targets[corrected], h.rho_T.numpy()[corrected], atol=1e-6)
    untouched = ~corrected & ~np.eye(3, dtype=bool)
    assert untouched.any() and np.all(h.rho_T.numpy()[untouched] == 0)
    assert np.allclose(method.targets[untouched], beta * cos[untouched], atol=1e-6)


def test_libmtl_imtl_agrees_at_its_initial_loss_scale():
    g = make_grads("random", 4, 200, 13).float().double()
    theirs, w_theirs, _ = run_libmtl("IMTL", g)
    ours, w = agg.aggregate(g, "imtl", return_weights=True)
    assert np.allclose(w, w_theirs, atol=1e-5) and rel_err(ours, theirs) <= 1e-5


def test_libmtl_cagrad_agrees_on_three_tasks():
    g = make_grads("random", 3, 200, 14).float().double()  # LibMTL hard-codes 3 tasks
    for c in (0.4, 0.8):
        theirs, _, _ = run_libmtl("CAGrad", g, calpha=c, rescale=1)
        ours = agg.aggregate(g, "cagrad", c=c)
        # Theirs: SLSQP at default tolerance and 1e-8 guards; ours: ftol 1e-15.
        assert rel_err(ours, theirs) <= 1e-3


def test_libmtl_mgda_is_never_better_than_the_exact_min_norm():
    for T, seed in [(3, 15), (5, 16), (8, 17)]:
        g = make_grads("random", T, 200, seed).float().double()
        theirs, w_theirs, _ = run_libmtl("MGDA", g, mgda_gn="none")
        ours = agg.aggregate(g, "mgda")
        # Frank-Wolfe (250 steps) stops near the exact min-norm point, never below it.
        assert ours.norm() <= theirs.norm() * (1 + 1e-6)
        assert rel_err(ours, theirs, input_scale(g)) <= 1e-2


def test_libmtl_mgda_two_tasks_clips_the_weight():
    g = torch.tensor([[1.0, 0.0], [2.0, 0.0]], dtype=torch.float64)  # g1 is the min-norm point
    theirs, w_theirs, _ = run_libmtl("MGDA", g, mgda_gn="none")
    _, w = agg.aggregate(g, "mgda", return_weights=True)
    assert np.allclose(w, [1.0, 0.0]) and np.allclose(w_theirs, [0.999, 0.001])  # pinned difference


def test_libmtl_uw_dwa_rlw_agree():
    g = make_grads("random", 3, 50, 18).float().double()
    s = torch.tensor([0.3, -0.2, 0.1])

    def set_scale(h):
        h.loss_scale.data.copy_(s)  # LibMTL starts at -0.5, we at 0 (init=): set both

    theirs, w_theirs, _ = run_libmtl("UW", g, setup=set_scale)
    uw = agg.make_method("uw", init=0.0)
    uw.load_state_dict({"log_vars": s.tolist()})
    ours, w = agg.aggregate(g, uw, return_weights=True)
    assert np.allclose(w, w_theirs, atol=1e-6) and rel_err(ours, theirs) <= 1e-5

    buffer = np.array([[1.0, 2.0], [1.0, 0.5], [2.0, 2.0]])  # per-epoch mean losses

    def set_buffer(h):
        h.epoch, h.train_loss_buffer = 2, buffer

    theirs, w_theirs, _ = run_libmtl("DWA", g, setup=set_buffer, T=2.0)
    dwa = agg.make_method("dwa", temperature=2.0)
    for epoch in range(2):
        dwa.loss_weights(buffer[:, epoch])
    ours, w = agg.aggregate(g, dwa, return_weights=True)
    assert np.allclose(w, w_theirs, atol=1e-6) and rel_err(ours, theirs) <= 1e-5

    torch.manual_seed(0)
    _, w_theirs, _ = run_libmtl("RLW", g, dist="Normal")
    torch.manual_seed(0)
    z = torch.randn(3).double().numpy()
    assert np.allclose(w_theirs, np.exp(z) / np.exp(z).sum(), atol=1e-6)  # our formula
    w = agg.make_method("rlw", seed=0).loss_weights([0.0] * 3)
    assert np.all(w > 0) and abs(w.sum() - 1) <= 1e-12


def test_native_engine_checks_its_arguments():
    g = np.ones((3, 10), dtype=np.float32)
    with pytest.raises(ValueError, match="dtype float32"):
        _native.gram(g.astype(np.float64))
    with pytest.raises(ValueError, match="2 dimension"):
        _native.gram(g[0])
    with pytest.raises(ValueError, match="C-contiguous"):
        _native.combine(g[:, ::2], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="at least one task"):
        _native.gram(np.ones((0, 5), dtype=np.float32))
    with pytest.raises(ValueError, match=r"weights must have shape \(3,\), got 9 values"):
        _native.combine(g, np.ones((3, 3)))
    with pytest.raises(ValueError, match="weights must be 3 real numbers"):
        _native.combine(g, ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"out must have shape \(10,\)"):
        _native.combine(g, [1.0, 1.0, 1.0], out=np.empty(9, dtype=np.float32))
    with pytest.raises(ValueError, match="must not overlap"):
        _native.combine(g, [1.0, 1.0, 1.0], out=g[1])
    with pytest.raises(ValueError, match="num_threads must be >= 0"):
        _native.gram(g, num_threads=-1)
    bad = g.copy()
    bad[2, 3] = np.inf
    with pytest.raises(ValueError, match="non-finite value .* at task 2, index 3"):
        _native.gram(bad)
    out = np.empty(10, dtype=np.float32)
    assert _native.combine(g, np.array([1, 2, 3]), out=out) is out and np.all(out == 6)
