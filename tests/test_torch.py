"""fastce.torch against torch.nn.functional: values, gradients (gradcheck in float64 and
autograd comparisons), zero-copy CPU dispatch, refusals, torch.compile tracing, and a training
loop on scikit-learn's bundled digits data."""
import itertools
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import fastce  # noqa: E402
import fastce.torch as ft  # noqa: E402

REDUCTIONS = ["mean", "sum", "none"]


def _gradcheck(fn, *inputs):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def _rand(*shape, dtype=torch.float64, grad=True, gen=None):
    return torch.randn(*shape, dtype=dtype, generator=gen).requires_grad_(grad)


def _index_target(gen, C, shape, ignore=True):
    t = torch.randint(0, C, shape, generator=gen)
    if ignore and t.numel() > 1:
        t.view(-1)[0] = -100
    return t


def _prob_target(gen, shape):
    return torch.softmax(torch.randn(*shape, dtype=torch.float64, generator=gen), 1)


# ---------------------------------------------------------------------------------------------
# gradcheck in float64 over the options (counted in the closing note: the ids below)

CE_GRADCHECK = list(itertools.product(["index", "index-kdim", "probs", "probs-kdim"],
                                      [False, True], [0.0, 0.2], REDUCTIONS))


@pytest.mark.parametrize("target_kind,weighted,smoothing,reduction", CE_GRADCHECK)
def test_gradcheck_cross_entropy(target_kind, weighted, smoothing, reduction):
    gen = torch.Generator().manual_seed(len(target_kind) * 7 + weighted)
    shape = (4, 5) if "kdim" not in target_kind else (3, 4, 2, 2)
    x = _rand(*shape, gen=gen)
    C = shape[1]
    if target_kind.startswith("index"):
        t = _index_target(gen, C, shape[:1] + shape[2:])
    else:
        t = _prob_target(gen, shape)
    w = torch.rand(C, dtype=torch.float64, generator=gen) + 0.5 if weighted else None
    _gradcheck(lambda z: ft.cross_entropy(z, t, weight=w, reduction=reduction,
                                          label_smoothing=smoothing), x)


NLL_GRADCHECK = list(itertools.product([(4, 5), (3, 4, 2, 2), (6,)], [False, True], REDUCTIONS))


@pytest.mark.parametrize("shape,weighted,reduction", NLL_GRADCHECK)
def test_gradcheck_nll_loss(shape, weighted, reduction):
    gen = torch.Generator().manual_seed(len(shape))
    x = _rand(*shape, gen=gen)
    C = shape[0] if len(shape) == 1 else shape[1]
    t = _index_target(gen, C, () if len(shape) == 1 else shape[:1] + shape[2:])
    w = torch.rand(C, dtype=torch.float64, generator=gen) + 0.5 if weighted else None
    _gradcheck(lambda z: ft.nll_loss(z, t, weight=w, reduction=reduction), x)


SOFTMAX_GRADCHECK = list(itertools.product(["log_softmax", "softmax", "logsumexp"],
                                           [0, 1, -1]))


@pytest.mark.parametrize("op,dim", SOFTMAX_GRADCHECK)
def test_gradcheck_softmax_family(op, dim):
    x = _rand(3, 4, 5, gen=torch.Generator().manual_seed(dim + 3))
    _gradcheck(lambda z: getattr(ft, op)(z, dim), x)


LINEAR_GRADCHECK = list(itertools.product([False, True], [0.0, 0.1], REDUCTIONS))


@pytest.mark.parametrize("with_bias,smoothing,reduction", LINEAR_GRADCHECK)
def test_gradcheck_linear_cross_entropy(with_bias, smoothing, reduction):
    gen = torch.Generator().manual_seed(11)
    h, w = _rand(5, 3, gen=gen), _rand(7, 3, gen=gen)
    b = _rand(7, gen=gen) if with_bias else None
    t = _index_target(gen, 7, (5,))
    inputs = (h, w) + ((b,) if with_bias else ())
    _gradcheck(lambda hh, ww, *bb: ft.linear_cross_entropy(
        hh, ww, t, *bb, reduction=reduction, label_smoothing=smoothing), *inputs)


# ---------------------------------------------------------------------------------------------
# values and gradients equal torch's on random configurations


def _random_ce_config(rng):
    kdim = rng.random() < 0.4
    N, C = int(rng.integers(1, 9)), int(rng.integers(1, 40))
    shape = (N, C) + ((int(rng.integers(1, 4)), int(rng.integers(1, 4))) if kdim else ())
    probs = rng.random() < 0.3
    return dict(shape=shape, probs=probs, weighted=rng.random() < 0.5,
                ignore_index=int(rng.choice([-100, 0, 1])) if not probs else -100,
                smoothing=float(rng.choice([0.0, 0.0, 0.1, 0.7])),
                reduction=str(rng.choice(REDUCTIONS)), scale=rng.random() < 0.5)


def _grads(loss, x, reduction, gen):
    go = torch.ones_like(loss) if reduction != "none" else torch.rand(
        loss.shape, dtype=loss.dtype, generator=gen)
    return torch.autograd.grad(loss, x, go)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cross_entropy_matches_torch_on_random_configurations(dtype):
    rng = np.random.default_rng(5)
    tol = dict(rtol=2e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-13)
    for _ in range(40):
        cfg = _random_ce_config(rng)
        gen = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
        shape, C = cfg["shape"], cfg["shape"][1]
        x = (torch.randn(*shape, dtype=dtype, generator=gen) * 3).requires_grad_(True)
        if cfg["probs"]:
            t = torch.softmax(torch.randn(*shape, dtype=dtype, generator=gen), 1)
        else:
            t = torch.randint(0, C, shape[:1] + shape[2:], generator=gen)
            t[torch.rand(t.shape, generator=gen) < 0.2] = cfg["ignore_index"]
        w = torch.rand(C, dtype=dtype, generator=gen) + 0.1 if cfg["weighted"] else None
        kw = dict(weight=w, ignore_index=cfg["ignore_index"], reduction=cfg["reduction"],
                  label_smoothing=cfg["smoothing"])
        ours, ref = ft.cross_entropy(x, t, **kw), F.cross_entropy(x, t, **kw)
        assert ours.dtype == ref.dtype and ours.shape == ref.shape, cfg
        torch.testing.assert_close(ours, ref, equal_nan=True, **tol)
        state = gen.get_state()
        g_ours = _grads(ours, x, cfg["reduction"], gen)
        gen.set_state(state)
        g_ref = _grads(ref, x, cfg["reduction"], gen)
        torch.testing.assert_close(g_ours, g_ref, equal_nan=True, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nll_loss_matches_torch_on_random_configurations(dtype):
    rng = np.random.default_rng(6)
    for _ in range(30):
        cfg = _random_ce_config(rng)
        gen = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
        shape, C = cfg["shape"], cfg["shape"][1]
        x = torch.log_softmax(torch.randn(*shape, dtype=dtype, generator=gen), 1)
        x.requires_grad_(True)
        t = torch.randint(0, C, shape[:1] + shape[2:], generator=gen)
        t[torch.rand(t.shape, generator=gen) < 0.2] = cfg["ignore_index"]
        w = torch.rand(C, dtype=dtype, generator=gen) + 0.1 if cfg["weighted"] else None
        kw = dict(weight=w, ignore_index=cfg["ignore_index"], reduction=cfg["reduction"])
        ours, ref = ft.nll_loss(x, t, **kw), F.nll_loss(x, t, **kw)
        torch.testing.assert_close(ours, ref, equal_nan=True)
        state = gen.get_state()
        g_ours = _grads(ours, x, cfg["reduction"], gen)
        gen.set_state(state)
        torch.testing.assert_close(g_ours, _grads(ref, x, cfg["reduction"], gen))


@pytest.mark.parametrize("op", ["log_softmax", "softmax", "logsumexp"])
def test_softmax_family_matches_torch(op):
    gen = torch.Generator().manual_seed(3)
    for shape, dim in [((7, 33), 1), ((2, 5, 6), 1), ((4, 3, 2), 0), ((9,), -1)]:
        x = (torch.randn(*shape, generator=gen) * 4).requires_grad_(True)
        ours, ref = getattr(ft, op)(x, dim), getattr(torch, op)(x, dim)
        torch.testing.assert_close(ours, ref)
        go = torch.randn(ref.shape, generator=gen)
        torch.testing.assert_close(torch.autograd.grad(ours, x, go)[0],
                                   torch.autograd.grad(ref, x, go)[0])
    x = torch.randn(3, 4, generator=gen)
    torch.testing.assert_close(ft.logsumexp(x, 1, keepdim=True), torch.logsumexp(x, 1, True))
    if op != "logsumexp":
        torch.testing.assert_close(getattr(ft, op)(x, 1, dtype=torch.float64),
                                   getattr(torch, op)(x, 1, dtype=torch.float64))


def test_half_precision_inputs_come_back_in_their_dtype():
    x = torch.randn(4, 6).requires_grad_(True)
    t = torch.tensor([0, 1, 2, 3])
    for dt in (torch.float16, torch.bfloat16):
        xd = x.detach().to(dt).requires_grad_(True)
        loss = ft.cross_entropy(xd, t)
        loss.backward()
        assert loss.dtype == dt and xd.grad.dtype == dt
        torch.testing.assert_close(loss.float(), F.cross_entropy(xd.float(), t),
                                   rtol=1e-2, atol=1e-2)


# ---------------------------------------------------------------------------------------------
# modules


@pytest.mark.parametrize("ours,theirs,kwargs", [
    (ft.CrossEntropyLoss, torch.nn.CrossEntropyLoss,
     dict(weight=torch.rand(5) + 0.5, ignore_index=2, reduction="sum", label_smoothing=0.1)),
    (ft.NLLLoss, torch.nn.NLLLoss, dict(weight=torch.rand(5) + 0.5, ignore_index=1,
                                        reduction="none")),
    (ft.CrossEntropyLoss, torch.nn.CrossEntropyLoss, {}),
    (ft.NLLLoss, torch.nn.NLLLoss, {}),
])
def test_modules_are_drop_ins(ours, theirs, kwargs):
    a, b = ours(**kwargs), theirs(**kwargs)
    assert isinstance(a, theirs)
    assert a.state_dict().keys() == b.state_dict().keys()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=gen)
    if ours is ft.NLLLoss:
        x = torch.log_softmax(x, 1)
    t = torch.randint(0, 5, (6,), generator=gen)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    la, lb = a(xa, t), b(xb, t)
    torch.testing.assert_close(la, lb)
    la.sum().backward()
    lb.sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)


def test_legacy_size_average_and_reduce_map_to_reduction():
    x, t = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    with pytest.warns(UserWarning):
        torch.testing.assert_close(ft.cross_entropy(x, t, size_average=False),
                                   F.cross_entropy(x, t, reduction="sum"))


# ---------------------------------------------------------------------------------------------
# CPU tensors reach the kernels without a copy


def test_cpu_tensors_reach_fastce_without_a_copy(monkeypatch):
    seen = {}
    for name in ("cross_entropy", "cross_entropy_with_grad", "log_softmax"):
        real = getattr(fastce, name)

        def spy(x, *args, _real=real, _name=name, **kwargs):
            seen[_name] = (x.__array_interface__["data"][0],
                           args[0].__array_interface__["data"][0] if args else None)
            return _real(x, *args, **kwargs)
        monkeypatch.setattr(fastce, name, spy)
    x = torch.randn(8, 10, requires_grad=True)
    t = torch.randint(0, 10, (8,))
    ft.cross_entropy(x, t).backward()
    ft.log_softmax(x, 1)
    assert seen["cross_entropy"] == (x.data_ptr(), t.data_ptr())
    assert seen["cross_entropy_with_grad"] == (x.data_ptr(), t.data_ptr())
    assert seen["log_softmax"][0] == x.data_ptr()
    # A non-contiguous tensor still works (fastce copies it into its layout).
    xt = torch.randn(10, 8).T
    torch.testing.assert_close(ft.cross_entropy(xt, t), F.cross_entropy(xt, t))


# ---------------------------------------------------------------------------------------------
# what fastce does not differentiate is refused, not silently dropped


def test_gradient_to_soft_targets_or_weights_is_refused():
    x = torch.randn(3, 4, requires_grad=True)
    soft = torch.softmax(torch.randn(3, 4), 1).requires_grad_(True)
    with pytest.raises(NotImplementedError, match="target requires grad"):
        ft.cross_entropy(x, soft)
    with pytest.raises(NotImplementedError, match="weight requires grad"):
        ft.cross_entropy(x, torch.tensor([0, 1, 2]), weight=torch.ones(4, requires_grad=True))
    with pytest.raises(NotImplementedError, match="weight requires grad"):
        ft.nll_loss(x, torch.tensor([0, 1, 2]), weight=torch.ones(4, requires_grad=True))
    with torch.no_grad():                      # no gradient wanted: fine
        torch.testing.assert_close(ft.cross_entropy(x, soft), F.cross_entropy(x, soft))


@pytest.mark.parametrize("call", [
    lambda x: ft.cross_entropy(x, torch.tensor([0, 1, 2])),
    lambda x: ft.nll_loss(x, torch.tensor([0, 1, 2])),
    lambda x: ft.log_softmax(x, 1).sum(),
    lambda x: ft.linear_cross_entropy(x, torch.randn(5, 4, dtype=torch.float64),
                                     torch.tensor([0, 1, 2])),
])
def test_double_backward_is_refused(call):
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        # (linear_cross_entropy refuses create_graph=True already in the first backward)
        g, = torch.autograd.grad(call(x), x, create_graph=True)
        g.sum().backward()


def test_linear_cross_entropy_backward_twice_through_one_graph():
    """The saved gradients are returned unscaled for an upstream 1: they must stay intact."""
    h = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(5, 4)
    t = torch.tensor([0, 1, 2])
    loss = ft.linear_cross_entropy(h, w, t)
    loss.backward(retain_graph=True)
    first = h.grad.clone()
    h.grad.mul_(100.0)                  # an optimizer touching .grad in place
    loss.backward(torch.tensor(2.0))    # accumulates 2 * gradient
    torch.testing.assert_close(h.grad, 102.0 * first)
    ref = h.detach().requires_grad_(True)
    F.cross_entropy(ref @ w.T, t).backward()
    torch.testing.assert_close(first, ref.grad)


def test_bad_arguments_raise_fastce_errors():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="reduction"):
        ft.cross_entropy(x, torch.tensor([0, 1, 2]), reduction="avg")
    with pytest.raises(IndexError, match="class index 9"):
        ft.cross_entropy(x, torch.tensor([0, 9, 2]))
    with pytest.raises(TypeError, match="integer class indices"):
        ft.nll_loss(x, torch.rand(3, 4))
    with pytest.raises(IndexError, match="out of range"):
        ft.softmax(x, 2)
    # Meta tensors get the fake (shape-only) implementation; other devices are refused.
    meta = ft.cross_entropy(torch.empty(3, 4, device="meta"),
                            torch.empty(3, dtype=torch.long, device="meta"), reduction="none")
    assert meta.shape == (3,) and meta.device.type == "meta"
    with pytest.raises(NotImplementedError, match="device 'meta'"):
        ft._run(fastce.cross_entropy, torch.empty(3, 4, device="meta"), torch.empty(3))


def test_import_fastce_does_not_import_torch():
    code = "import sys, fastce; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------
# binary cross-entropy (probabilities) and with logits

# pos_weight is an option of the logits form only: the probability form runs without it.
BCE_GRADCHECK = [c for c in itertools.product(["probs", "logits"], [None, "full", "row"],
                                              [False, True], REDUCTIONS)
                 if not (c[0] == "probs" and c[2])]


@pytest.mark.parametrize("kind,weight_kind,with_pos_weight,reduction", BCE_GRADCHECK)
def test_gradcheck_bce(kind, weight_kind, with_pos_weight, reduction):
    gen = torch.Generator().manual_seed(17)
    shape = (4, 3)
    y = torch.rand(shape, dtype=torch.float64, generator=gen)
    w = {None: None, "full": torch.rand(shape, dtype=torch.float64, generator=gen) + 0.5,
         "row": torch.rand(3, dtype=torch.float64, generator=gen) + 0.5}[weight_kind]
    if kind == "probs":
        x = (torch.rand(shape, dtype=torch.float64, generator=gen) * 0.8 + 0.1)
        x.requires_grad_(True)
        _gradcheck(lambda z: ft.binary_cross_entropy(z, y, weight=w, reduction=reduction), x)
    else:
        x = _rand(*shape, gen=gen)
        pw = torch.rand(3, dtype=torch.float64, generator=gen) + 0.5 if with_pos_weight else None
        _gradcheck(lambda z: ft.binary_cross_entropy_with_logits(
            z, y, weight=w, reduction=reduction, pos_weight=pw), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bce_matches_torch_on_random_configurations(dtype):
    rng = np.random.default_rng(8)
    for _ in range(20):
        gen = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
        shape = tuple(int(d) for d in rng.integers(1, 6, int(rng.integers(1, 4))))
        reduction = str(rng.choice(REDUCTIONS))
        y = torch.rand(shape, dtype=dtype, generator=gen)
        w = torch.rand(shape[-1:], dtype=dtype, generator=gen) if rng.random() < 0.5 else None
        pw = torch.rand(shape[-1:], dtype=dtype, generator=gen) * 2 if rng.random() < 0.5 else None
        p = (torch.rand(shape, dtype=dtype, generator=gen) * 0.98 + 0.01).requires_grad_(True)
        x = (torch.randn(shape, dtype=dtype, generator=gen) * 4).requires_grad_(True)
        go = torch.rand(shape if reduction == "none" else (), dtype=dtype, generator=gen)
        for ours, ref, inp in (
                (ft.binary_cross_entropy(p, y, weight=w, reduction=reduction),
                 F.binary_cross_entropy(p, y, weight=w, reduction=reduction), p),
                (ft.binary_cross_entropy_with_logits(x, y, weight=w, reduction=reduction,
                                                     pos_weight=pw),
                 F.binary_cross_entropy_with_logits(x, y, weight=w, reduction=reduction,
                                                    pos_weight=pw), x)):
            torch.testing.assert_close(ours, ref)
            torch.testing.assert_close(torch.autograd.grad(ours, inp, go)[0],
                                       torch.autograd.grad(ref, inp, go)[0])


@pytest.mark.parametrize("ours,theirs,kwargs", [
    (ft.BCELoss, torch.nn.BCELoss, dict(weight=torch.rand(3) + 0.5, reduction="sum")),
    (ft.BCEWithLogitsLoss, torch.nn.BCEWithLogitsLoss,
     dict(weight=torch.rand(3) + 0.5, reduction="none", pos_weight=torch.rand(3) + 0.5)),
    (ft.BCELoss, torch.nn.BCELoss, {}),
    (ft.BCEWithLogitsLoss, torch.nn.BCEWithLogitsLoss, {}),
])
def test_bce_modules_are_drop_ins(ours, theirs, kwargs):
    a, b = ours(**kwargs), theirs(**kwargs)
    assert isinstance(a, theirs)
    assert a.state_dict().keys() == b.state_dict().keys()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(5, 3, generator=gen) * 0.9 + 0.05
    y = torch.rand(5, 3, generator=gen)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    la, lb = a(xa, y), b(xb, y)
    torch.testing.assert_close(la, lb)
    la.sum().backward()
    lb.sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)


def test_bce_refuses_gradients_to_target_weight_and_pos_weight():
    x = torch.randn(3, requires_grad=True)
    y = torch.rand(3)
    with pytest.raises(NotImplementedError, match="target requires grad"):
        ft.binary_cross_entropy_with_logits(x, y.clone().requires_grad_(True))
    with pytest.raises(NotImplementedError, match="pos_weight requires grad"):
        ft.binary_cross_entropy_with_logits(x, y, pos_weight=torch.ones(3, requires_grad=True))
    with pytest.raises(NotImplementedError, match="weight requires grad"):
        ft.binary_cross_entropy(torch.rand(3, requires_grad=True), y,
                                weight=torch.ones(3, requires_grad=True))


# ---------------------------------------------------------------------------------------------
# torch.compile


def _uses_every_op(x, t, h, w):
    out = x * 2
    loss = ft.CrossEntropyLoss(label_smoothing=0.1)(out, t)
    loss = loss + ft.nll_loss(ft.log_softmax(out, 1), t) + ft.logsumexp(out, 1).mean()
    loss = loss + ft.softmax(out, 1).max() + ft.linear_cross_entropy(h, w, t)
    y = torch.sigmoid(x.detach())
    loss = loss + ft.BCEWithLogitsLoss(pos_weight=torch.ones(5))(out, y)
    loss = loss + ft.binary_cross_entropy(torch.sigmoid(out), y)
    return loss


def test_dynamo_traces_every_op_without_a_graph_break():
    x = torch.randn(6, 5, requires_grad=True)
    t = torch.randint(0, 5, (6,))
    h, w = torch.randn(6, 3, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    explanation = torch._dynamo.explain(_uses_every_op)(x, t, h, w)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


# ---------------------------------------------------------------------------------------------
# a real training loop: an MLP on scikit-learn's bundled digits data


def _train_digits(loss_fn, compile_model=False, steps=100):
    datasets = pytest.importorskip("sklearn.datasets")
    X, y = datasets.load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)

    def step(xb, yb):
        return loss_fn(model(xb), yb)
    if compile_model:
        step = torch.compile(step)
    losses = []
    for i in range(steps):
        idx = torch.arange(i * 128, (i + 1) * 128) % len(y)
        opt.zero_grad()
        loss = step(X[idx], y[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        accuracy = (model(X).argmax(1) == y).float().mean().item()
    return np.array(losses), accuracy


def test_training_curve_matches_torch_eager_and_compiled(capsys):
    ref_losses, ref_acc = _train_digits(torch.nn.CrossEntropyLoss(label_smoothing=0.05))
    ours = ft.CrossEntropyLoss(label_smoothing=0.05)
    for compiled in (False, True):
        losses, acc = _train_digits(ours, compile_model=compiled)
        rel = np.max(np.abs(losses - ref_losses) / np.abs(ref_losses))
        with capsys.disabled():
            print(f"\ndigits MLP, 100 SGD steps, compiled={compiled}: max relative loss "
                  f"difference {rel:.2e}, accuracy {acc:.4f} (torch {ref_acc:.4f})")
        assert rel < 1e-4
        assert acc == ref_acc
        assert losses[-1] < 0.5 * losses[0]          # it did learn
