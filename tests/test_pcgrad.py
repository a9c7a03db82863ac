"""PCGrad: native (Rust), torch Gram path and the naive loop agree; checks; the wrapper."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mtbert import _native
from mtbert.mtl import pcgrad as pcg
from mtbert.pcgrad import (
    PCGrad,
    gradient_conflicts,
    pcgrad,
    pcgrad_naive,
    pcgrad_torch,
    random_orders,
)

TOL = 1e-5


def rel_err(got, want) -> float:
    got = torch.as_tensor(np.asarray(got), dtype=torch.float64)
    want = torch.as_tensor(np.asarray(want), dtype=torch.float64)
    den = want.norm().item()
    num = (got - want).norm().item()
    return num / den if den > 0 else num


def oracle(grads: np.ndarray, orders, reduction="mean", eps=1e-12) -> np.ndarray:
    """The naive loop in float64."""
    g64 = torch.from_numpy(np.asarray(grads, dtype=np.float64))
    return pcgrad_naive(g64, order=orders, reduction=reduction, eps=eps).numpy()


def decision_margin(grads: np.ndarray, orders) -> float:
    """Smallest |p_i · g_j| / (||p_i|| ||g_j||) over all projection decisions (float64).

    Near 0 a decision d < 0 flips with rounding, and no float32 method can be compared
    with the oracle there; hypothesis examples below a margin are discarded.
    """
    g = np.asarray(grads, dtype=np.float64)
    gram = g @ g.T
    T = g.shape[0]
    margin = np.inf
    for i in range(T):
        c = np.eye(T)[i]
        for j in orders[i]:
            d = c @ gram[:, j]
            scale = np.sqrt(max(c @ gram @ c, 0.0) * gram[j, j])
            if scale > 0:
                margin = min(margin, abs(d) / scale)
            if d < 0 and gram[j, j] + 1e-12 > 0:
                c[j] -= d / (gram[j, j] + 1e-12)
    return margin


def make_grads(kind: str, T: int, P: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "random":  # about half the pairs conflict
        g = rng.standard_normal((T, P))
    elif kind == "conflicts":  # every pair conflicts: a shared component pointing apart
        base = rng.standard_normal((T, P)) * 0.1
        direction = rng.standard_normal(P)
        signs = np.where(np.arange(T) % 2 == 0, 1.0, -1.0)
        g = base + signs[:, None] * direction * (1 + np.arange(T)[:, None])
    elif kind == "no_conflicts":
        g = np.abs(rng.standard_normal((T, P))) + 0.1
    elif kind == "identical":
        g = np.repeat(rng.standard_normal((1, P)), T, axis=0)
    elif kind == "opposite":
        row = rng.standard_normal(P)
        g = np.stack([row * (-2.0) ** k for k in range(T)])  # exact in float32
    elif kind == "zeros":  # some all-zero tasks among random ones
        g = rng.standard_normal((T, P))
        g[::2] = 0.0
    elif kind == "scaled":  # norms over 6 orders of magnitude
        g = rng.standard_normal((T, P)) * np.logspace(-3, 3, T)[:, None]
    else:
        raise AssertionError(kind)
    return np.ascontiguousarray(g, dtype=np.float32)


KINDS = ["random", "conflicts", "no_conflicts", "identical", "opposite", "zeros", "scaled"]


# --------------------------------------------------------------------------------------
# Orders
# --------------------------------------------------------------------------------------


def test_orders_from_seed_match_native_and_are_permutations():
    for T in range(1, 9):
        for seed in (0, 1, 12345, 2**64 - 1):
            ours = random_orders(T, seed)
            # The native core draws the same orders for the same seed (bitwise-equal result).
            g = make_grads("random", T, 257, seed % 1000)
            np.testing.assert_array_equal(_native.pcgrad(g, seed=seed), _native.pcgrad(g, order=ours))
            for row in ours:
                assert sorted(row.tolist()) == list(range(T))
    # Pinned (rust/pcgrad.rs pins the same rows).
    np.testing.assert_array_equal(random_orders(3, 0), [[1, 0, 2], [2, 1, 0], [1, 2, 0]])


def test_seed_gives_identical_results_native_and_torch():
    g = make_grads("random", 5, 20_000, 0)
    a = _native.pcgrad(g, seed=7)
    b = pcgrad_torch(torch.from_numpy(g), seed=7).numpy()
    c = _native.pcgrad(g, order=random_orders(5, 7))
    np.testing.assert_array_equal(a, c)
    assert rel_err(a, b) <= TOL
    assert rel_err(a, oracle(g, random_orders(5, 7))) <= TOL


def test_without_seed_orders_are_fresh_but_valid():
    g = make_grads("conflicts", 4, 1000, 1)
    outs = {_native.pcgrad(g).tobytes() for _ in range(20)}
    assert len(outs) > 1  # 24^4 possible order sets: repeats all 20 times are unlikely


# --------------------------------------------------------------------------------------
# Agreement: native, torch, naive
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", range(2, 9))
@pytest.mark.parametrize("kind", KINDS)
def test_native_torch_naive_agree(T, kind):
    P = 4099 + 1000 * T
    g = make_grads(kind, T, P, seed=T * 100 + KINDS.index(kind))
    orders = random_orders(T, seed=T)
    for reduction in ("mean", "sum"):
        want = oracle(g, orders, reduction)
        native = _native.pcgrad(g, order=orders, reduction=reduction)
        torch_path = pcgrad_torch(torch.from_numpy(g), order=orders, reduction=reduction)
        naive32 = pcgrad_naive(torch.from_numpy(g), order=orders, reduction=reduction)
        scale = np.linalg.norm(g.astype(np.float64), axis=1).max()
        if np.linalg.norm(want) <= 1e-9 * scale:  # exactly 0 ("opposite"): rounding noise only
            for got in (native, torch_path, naive32):
                assert np.linalg.norm(np.asarray(got, dtype=np.float64)) <= TOL * scale
            continue
        assert rel_err(native, want) <= TOL, (kind, T, reduction)
        assert rel_err(torch_path, want) <= TOL, (kind, T, reduction)
        assert rel_err(naive32, want) <= TOL, (kind, T, reduction)
        assert np.isfinite(native).all()


def test_large_p_accuracy():
    """3M columns: many chunks and blocks; float32 accumulation would drift here."""
    g = make_grads("conflicts", 3, 3_000_017, 5)
    orders = random_orders(3, 11)
    want = oracle(g, orders)
    assert rel_err(_native.pcgrad(g, order=orders), want) <= TOL
    assert rel_err(pcgrad_torch(torch.from_numpy(g), order=orders), want) <= TOL
    gram = _native.gram(g)
    exact = g.astype(np.float64) @ g.astype(np.float64).T
    assert np.abs(gram - exact).max() <= 1e-6 * np.abs(exact).max()


def test_known_projection():
    g = np.array([[1.0, 0.0], [-1.0, 1.0]], dtype=np.float32)
    order = [[0, 1], [1, 0]]
    # p0 = g0 - (-1/2) g1 = (0.5, 0.5); p1 = g1 - (-1/1) g0 = (0, 1).
    np.testing.assert_allclose(_native.pcgrad(g, order=order, reduction="sum", eps=0.0), [0.5, 1.5])
    np.testing.assert_allclose(_native.pcgrad(g, order=order, eps=0.0), [0.25, 0.75])
    np.testing.assert_allclose(pcgrad_torch(torch.from_numpy(g), order=order, eps=0.0), [0.25, 0.75])


def test_explicit_orders_with_self_anywhere():
    g = make_grads("random", 4, 5000, 3)
    order = np.array([[0, 1, 2, 3], [3, 1, 2, 0], [2, 0, 3, 1], [1, 0, 3, 2]], dtype=np.int32)
    want = oracle(g, order)
    assert rel_err(_native.pcgrad(g, order=order), want) <= TOL
    assert rel_err(pcgrad_torch(torch.from_numpy(g), order=torch.from_numpy(order)), want) <= TOL
    # Rows that repeat a task (so skip another) are refused by both paths.
    repeats = np.array([[0, 0, 0, 0], [3, 1, 2, 0], [2, 2, 2, 2], [1, 1, 3, 0]], dtype=np.int32)
    with pytest.raises(ValueError, match="order row 0 is not a permutation"):
        _native.pcgrad(g, order=repeats)
    with pytest.raises(ValueError, match="order row 0 is not a permutation"):
        pcgrad_torch(torch.from_numpy(g), order=repeats)
    # Orders change the result when there are conflicts.
    a = _native.pcgrad(g, order=random_orders(4, 0))
    b = _native.pcgrad(g, order=random_orders(4, 1))
    assert not np.array_equal(a, b)


def test_single_task_and_empty_columns():
    g = make_grads("random", 1, 100, 0)
    np.testing.assert_array_equal(_native.pcgrad(g), g[0])
    np.testing.assert_array_equal(pcgrad_torch(torch.from_numpy(g)).numpy(), g[0])
    empty = np.zeros((3, 0), dtype=np.float32)
    assert _native.pcgrad(empty, seed=0).shape == (0,)


def test_zero_gradients_never_nan():
    g = np.zeros((4, 1000), dtype=np.float32)
    for eps in (0.0, 1e-12):
        assert (_native.pcgrad(g, seed=1, eps=eps) == 0).all()
        assert (pcgrad_torch(torch.from_numpy(g), seed=1, eps=eps) == 0).all()
    g[1] = make_grads("random", 1, 1000, 0)[0]
    assert np.isfinite(_native.pcgrad(g, seed=2, eps=0.0)).all()
    cos = gradient_conflicts(g).cosine.numpy()  # cosines from _native.gram's Gram matrix
    assert np.isfinite(cos).all() and cos[0, 1] == 0 and cos[1, 1] == pytest.approx(1.0)


def test_thread_count_does_not_change_bits():
    g = make_grads("random", 3, 200_000, 9)
    one = _native.pcgrad(g, seed=3, num_threads=1)
    two = _native.pcgrad(g, seed=3, num_threads=2)
    np.testing.assert_array_equal(one, two)


def test_huge_finite_values_are_not_reported_as_nan():
    g = np.array([[3e20, 1.0], [-3e20, 2.0]], dtype=np.float32)
    out = _native.pcgrad(g, seed=0)
    assert np.isfinite(out).all()
    assert rel_err(out, oracle(g, random_orders(2, 0))) <= TOL


@settings(max_examples=150, deadline=None)
@given(
    data=st.data(),
    T=st.integers(1, 6),
    P=st.integers(1, 400),
    reduction=st.sampled_from(["mean", "sum"]),
)
def test_hypothesis_matches_naive(data, T, P, reduction):
    elems = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)
    g = data.draw(arrays(np.float32, (T, P), elements=elems))
    seed = data.draw(st.integers(0, 2**64 - 1))
    orders = random_orders(T, seed)
    assume(decision_margin(g, orders) > 1e-3)
    want = oracle(g, orders, reduction)
    # Errors scale with the inputs, not with a result that may cancel to ~0.
    scale = max(np.linalg.norm(want), np.linalg.norm(g.astype(np.float64), axis=1).max())
    native = _native.pcgrad(g, seed=seed, reduction=reduction)
    torch_path = pcgrad_torch(torch.from_numpy(g), seed=seed, reduction=reduction).numpy()
    for got in (native, torch_path):
        assert np.linalg.norm(got.astype(np.float64) - want) <= TOL * scale


@settings(max_examples=50, deadline=None)
@given(T=st.integers(1, 8), seed=st.integers(0, 2**64 - 1))
def test_hypothesis_orders_agree(T, seed):
    g = make_grads("random", T, 65, seed % 997)
    np.testing.assert_array_equal(_native.pcgrad(g, seed=seed), _native.pcgrad(g, order=random_orders(T, seed)))


# --------------------------------------------------------------------------------------
# Checks (ValueError) and buffers
# --------------------------------------------------------------------------------------


GOOD = make_grads("random", 3, 64, 0)


@pytest.mark.parametrize(
    "grads, match",
    [
        (GOOD.astype(np.float64), "dtype float32"),
        (GOOD.astype(np.int32), "dtype float32"),
        (GOOD.astype(">f4"), "dtype float32"),
        (GOOD[0], "2 dimension"),
        (GOOD[None], "2 dimension"),
        (np.asfortranarray(GOOD), "C-contiguous"),
        (GOOD[:, ::2], "C-contiguous"),
        (np.zeros((0, 5), np.float32), "at least one task"),
        (GOOD.tolist(), "numpy.ndarray"),
        (torch.from_numpy(GOOD), "numpy.ndarray"),
    ],
)
def test_bad_grads_raise(grads, match):
    with pytest.raises(ValueError, match=match):
        _native.pcgrad(grads)
    with pytest.raises(ValueError, match=match):
        _native.gram(grads)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_raises_with_location(value):
    g = GOOD.copy()
    g[2, 17] = value
    with pytest.raises(ValueError, match=r"non-finite .* task 2, index 17"):
        _native.pcgrad(g, seed=0)
    with pytest.raises(ValueError, match=r"task 2, index 17"):
        _native.gram(g)
    with pytest.raises(ValueError, match=r"non-finite .* task 2, index 17"):
        pcgrad_torch(torch.from_numpy(g.astype(np.float64)), seed=0)
    with pytest.raises(ValueError, match=r"non-finite"):
        pcgrad(torch.from_numpy(g), seed=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(order=np.zeros((3, 2), np.int64)), r"shape \(3, 3\)"),
        (dict(order=np.zeros((2, 3, 3), np.int64)), r"shape \(3, 3\)"),
        (dict(order=[[0, 1, 3], [0, 1, 2], [0, 1, 2]]), r"order\[0, 2\] = 3"),
        (dict(order=[[0, 1, 2], [0, -1, 2], [0, 1, 2]]), r"order\[1, 1\] = -1"),
        (dict(order=np.zeros((3, 3), np.float32)), "integer"),
        (dict(order=[[0, 1, 2], [1, 1, 2], [0, 1, 2]]), r"order row 1 is not a permutation .* task 1 appears"),
        (dict(order=np.zeros((3, 3), np.int64)), "not a permutation"),
        (dict(order=np.full((3, 3), 2**64 - 1, np.uint64)), "not a task index"),
        (dict(num_threads=10**5), "num_threads must be at most 1024"),
        (dict(reduction="avg"), "unknown reduction"),
        (dict(eps=-1.0), "eps"),
        (dict(eps=float("nan")), "eps"),
        (dict(seed=-1), "seed"),
        (dict(num_threads=-1), "num_threads"),
        (dict(out=np.zeros(63, np.float32)), "out"),
        (dict(out=np.zeros(64, np.float64)), "out must have dtype float32"),
        (dict(out=np.zeros((1, 64), np.float32)), "out must have 1 dimension"),
        (dict(out=np.zeros(128, np.float32)[::2]), "out must be C-contiguous"),
        (dict(out=GOOD[1]), "overlap"),
        (dict(gram_out=np.zeros((3, 2))), "gram_out"),
        (dict(gram_out=np.zeros((3, 3), np.float32)), "gram_out must have dtype float64"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _native.pcgrad(GOOD, **kwargs)


def test_read_only_out_raises():
    out = np.zeros(64, np.float32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out"):
        _native.pcgrad(GOOD, out=out)


def test_torch_path_argument_checks():
    t = torch.from_numpy(GOOD).double()
    with pytest.raises(ValueError, match="out"):
        pcgrad_torch(t, out=torch.zeros(64))  # float32 out for float64 grads
    with pytest.raises(ValueError, match="unknown reduction"):
        pcgrad_torch(t, reduction="max")
    with pytest.raises(ValueError, match=r"shape \(3, 3\)"):
        pcgrad_torch(t, order=[[0, 1], [1, 0]])
    with pytest.raises(ValueError, match="2 dimensions"):
        pcgrad_torch(t[0])
    with pytest.raises(ValueError, match=r"order row 2 is not a permutation .* task 0 appears"):
        pcgrad_torch(t, order=[[0, 1, 2], [2, 1, 0], [0, 0, 1]])
    with pytest.raises(ValueError, match="at most 512"):
        pcgrad_torch(torch.zeros(513, 2, dtype=torch.float64))


def test_out_and_gram_out_are_written_in_place():
    out = np.full(64, np.nan, np.float32)
    gram = np.zeros((3, 3))
    result = _native.pcgrad(GOOD, seed=4, out=out, gram_out=gram)
    assert result is out
    np.testing.assert_array_equal(out, _native.pcgrad(GOOD, seed=4))
    g64 = GOOD.astype(np.float64)
    np.testing.assert_allclose(gram, g64 @ g64.T, rtol=1e-6)


def test_dispatcher_is_zero_copy_for_cpu_float32(monkeypatch):
    t = torch.randn(3, 5000, requires_grad=True)
    out = torch.empty(5000)
    seen = {}
    real = _native.pcgrad

    def spy(grads, **kwargs):
        seen["grads"] = grads.__array_interface__["data"][0]
        seen["out"] = kwargs["out"].__array_interface__["data"][0]
        return real(grads, **kwargs)

    monkeypatch.setattr(pcg._native, "pcgrad", spy)
    result = pcgrad(t, seed=1, out=out)
    assert result is out
    assert seen == {"grads": t.data_ptr(), "out": out.data_ptr()}
    want = pcgrad_torch(t.detach(), seed=1)
    assert rel_err(out, want) <= TOL


def test_dispatcher_routes_other_tensors_to_torch():
    g = torch.from_numpy(make_grads("random", 3, 2000, 2))
    native = pcgrad(g, seed=5)
    f64 = pcgrad(g.double(), seed=5)  # torch path
    strided = pcgrad(g.T.contiguous().T, seed=5)  # non-contiguous: torch path
    assert f64.dtype == torch.float64
    assert rel_err(native, f64) <= TOL and rel_err(native, strided) <= TOL
    assert isinstance(pcgrad(g.numpy(), seed=5), np.ndarray)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_native():
    g = make_grads("conflicts", 4, 1_000_003, 6)
    want = _native.pcgrad(g, seed=9)
    got = pcgrad(torch.from_numpy(g).cuda(), seed=9)
    assert got.is_cuda
    assert rel_err(got.cpu(), want) <= TOL


# --------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------


def test_gradient_conflicts():
    g = np.array([[1, 0, 0], [-1, 1, 0], [0, 0, 0], [1, 1, 0]], dtype=np.float32)
    for source in (g, torch.from_numpy(g), torch.from_numpy(g).double()):
        stats = gradient_conflicts(source)
        assert stats.conflicts == 1 and stats.conflict_pairs == [(0, 1)]
        assert stats.gram.shape == (4, 4) and stats.gram.dtype == torch.float64
        assert stats.cosine[0, 1].item() == pytest.approx(-1 / np.sqrt(2))
        assert stats.cosine[2].abs().sum().item() == 0  # zero gradient: cosine 0
        assert stats.cosine[3, 3].item() == pytest.approx(1.0)


# --------------------------------------------------------------------------------------
# The training wrapper
# --------------------------------------------------------------------------------------


class TinyMultiTask(torch.nn.Module):
    """A shared encoder, one head per task; `extra` is used by task 0 only."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = torch.nn.Linear(6, 8).to(dtype)
        self.extra = torch.nn.Linear(8, 8).to(dtype)
        self.unused = torch.nn.Parameter(torch.ones(3, dtype=dtype))  # shared, never used
        self.heads = torch.nn.ModuleList([torch.nn.Linear(8, 1).to(dtype) for _ in range(3)])

    def shared_params(self):
        return list(self.encoder.parameters()) + list(self.extra.parameters()) + [self.unused]

    def losses(self, x, targets):
        h = torch.tanh(self.encoder(x))  # (B, 8)
        out = []
        for i, head in enumerate(self.heads):
            hi = torch.tanh(self.extra(h)) if i == 0 else h
            out.append(((head(hi).squeeze(-1) - targets[i]) ** 2).mean())
        return out


def batch(step: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(16, 6, generator=g, dtype=dtype)
    # Opposed targets: tasks pull the encoder in conflicting directions.
    targets = [torch.randn(16, generator=g, dtype=dtype) * s for s in (1.0, -3.0, 2.0)]
    return x, targets


def by_hand(model: TinyMultiTask, losses, orders):
    """Per-task gradients, the naive loop in float64, and the heads' own gradients."""
    shared = model.shared_params()
    rows, heads = [], []
    for i, loss in enumerate(losses):
        gs = torch.autograd.grad(loss, shared + list(model.heads[i].parameters()), retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(shared, gs)]))
        heads.append(gs[len(shared):])
    flat = pcgrad_naive(torch.stack(rows).double(), order=orders)
    return flat, heads


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_wrapper_matches_naive_by_hand(backend):
    model = TinyMultiTask()
    heads = [list(h.parameters()) for h in model.heads]
    pc = PCGrad(model.shared_params(), heads, seed=0, backend=backend)
    conflicts_seen = 0
    for step in range(4):
        x, targets = batch(step)
        stats = pc.backward(model.losses(x, targets))
        losses = model.losses(x, targets)  # the same values, a fresh graph
        want, want_heads = by_hand(model, losses, stats.orders.numpy())
        got = torch.cat([p.grad.reshape(-1) for p in model.shared_params()])
        assert rel_err(got, want) <= TOL
        assert model.unused.grad is not None and (model.unused.grad == 0).all()
        for i, head in enumerate(model.heads):
            for p, g in zip(head.parameters(), want_heads[i]):
                torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
        conflicts_seen += stats.conflicts
        assert stats.cosine.shape == (3, 3)
        assert len(stats.conflict_pairs) == stats.conflicts
        model.zero_grad(set_to_none=True)
    assert conflicts_seen > 0  # the test exercised projections


def test_wrapper_allocates_once_and_grads_view_the_result():
    model = TinyMultiTask()
    pc = PCGrad(model.shared_params(), [list(h.parameters()) for h in model.heads], seed=1)
    buf_ptr, res_ptr = pc.buffer.data_ptr(), pc.result.data_ptr()
    assert pc.buffer.shape == (3, pc.num_params)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    lo, hi = res_ptr, res_ptr + pc.result.numel() * 4
    for step in range(3):
        x, targets = batch(step)
        pc.backward(model.losses(x, targets))
        assert pc.buffer.data_ptr() == buf_ptr and pc.result.data_ptr() == res_ptr
        for p in model.shared_params():
            assert lo <= p.grad.data_ptr() < hi  # a view: nothing P-sized allocated
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_wrapper_is_reproducible_and_backends_agree():
    def run(seed, backend):
        model = TinyMultiTask()
        pc = PCGrad(model.shared_params(), [list(h.parameters()) for h in model.heads], seed=seed, backend=backend)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        orders = []
        for step in range(5):
            x, targets = batch(step)
            orders.append(pc.backward(model.losses(x, targets)).orders)
            opt.step()
            opt.zero_grad()
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), torch.stack(orders)

    a, oa = run(123, "native")
    b, ob = run(123, "native")
    c, oc = run(123, "torch")
    _, od = run(124, "native")
    assert torch.equal(a, b) and torch.equal(oa, ob) and torch.equal(oa, oc)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
    assert not torch.equal(oa, od)


def test_wrapper_constant_loss_and_no_task_params():
    model = TinyMultiTask()
    pc = PCGrad(model.shared_params(), seed=0)  # no heads given: buffer at first backward
    assert pc.num_tasks is None
    x, targets = batch(0)
    losses = model.losses(x, targets)
    losses[2] = torch.tensor(0.0)  # this task had no batch this step
    stats = pc.backward(losses)
    assert pc.num_tasks == 3
    assert stats.gram[2].abs().sum() == 0
    losses = model.losses(x, targets)
    want, _ = by_hand(model, [losses[0], losses[1], losses[2] * 0], stats.orders.numpy())
    got = torch.cat([p.grad.reshape(-1) for p in model.shared_params()])
    assert rel_err(got, want) <= TOL
    with pytest.raises(ValueError, match="expected 3 losses"):
        pc.backward(losses[:2])


def test_wrapper_float64_params_get_their_own_grad():
    model = TinyMultiTask(torch.float64)
    pc = PCGrad(model.shared_params(), [list(h.parameters()) for h in model.heads], seed=2)
    x, targets = batch(0, torch.float64)
    stats = pc.backward(model.losses(x, targets))
    want, _ = by_hand(model, model.losses(x, targets), stats.orders.numpy())
    got = torch.cat([p.grad.reshape(-1) for p in model.shared_params()])
    assert got.dtype == torch.float64
    assert rel_err(got, want) <= TOL


def test_wrapper_argument_checks():
    model = TinyMultiTask()
    shared = model.shared_params()
    with pytest.raises(ValueError, match="also in the shared"):
        PCGrad(shared, [[shared[0]], [], []])
    head = list(model.heads[0].parameters())
    with pytest.raises(ValueError, match="task 1"):
        PCGrad(shared, [head, head])
    with pytest.raises(ValueError, match="backend"):
        PCGrad(shared, backend="cuda")
    with pytest.raises(ValueError, match="reduction"):
        PCGrad(shared, reduction="median")
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    for params in ([], [frozen]):
        with pytest.raises(ValueError, match="requires_grad=True"):
            PCGrad(params)
    with pytest.raises(ValueError, match="must hold tensors"):
        PCGrad([1.0])


def test_wrapper_skips_frozen_parameters():
    model = TinyMultiTask()
    model.extra.weight.requires_grad_(False)
    pc = PCGrad(model.parameters(), seed=0, num_tasks=3)  # heads shared too, here
    assert all(p is not model.extra.weight for p in pc.shared)
    x, targets = batch(0)
    pc.backward(model.losses(x, targets))
    assert model.extra.weight.grad is None
    assert model.encoder.weight.grad is not None
