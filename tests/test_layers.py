"""normswap.layers: BatchRenorm, IBN and the conditional norms against hand computations."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers.norm_act import BatchNormAct2d

from normswap.families import family_of, near_family_of
from normswap.layers import (
    IBN,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    ConditionalBatchNorm2d,
    ConditionalInstanceNorm2d,
    conditioned,
    set_condition,
)
from normswap.layers.renorm import _BatchRenorm

D = torch.float64


def bshape(x):
    """Shape that broadcasts a per-channel vector over x."""
    return [1, -1] + [1] * (x.ndim - 2)


def stat_dims(x):
    return [0, *range(2, x.ndim)]


def trained_bn(bn, shape, seed=0):
    """Realistic BN state: random γ/β, running statistics from a train pass, then perturbed."""
    gen = torch.Generator().manual_seed(seed)
    c = bn.num_features
    dt = bn.running_mean.dtype
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.copy_(torch.rand(c, generator=gen, dtype=dt) + 0.5)
            bn.bias.copy_(torch.rand(c, generator=gen, dtype=dt) * 0.4 - 0.2)
    bn.train()
    x = torch.randn(shape, generator=gen, dtype=dt) * 2 + 0.7
    with torch.no_grad():
        bn(x)
        bn.running_mean.add_(torch.randn(c, generator=gen, dtype=dt) * 0.3)
        bn.running_var.mul_(torch.rand(c, generator=gen, dtype=dt) + 0.5)
    return bn.eval()


def randn(*shape, seed=0, dtype=D, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=dtype) * 1.5 + 0.3).requires_grad_(requires_grad)


# ----------------------------------------------------------------------------------------------------------------
# BatchRenorm
# ----------------------------------------------------------------------------------------------------------------

def renorm_reference(x, rm, rv, w, b, eps, rmax, dmax, *, detach=True):
    """The paper's train-mode formula, written out; detach=False lets gradients flow through r and d."""
    s = bshape(x)
    mu = x.mean(stat_dims(x))
    var_b = ((x - mu.reshape(s)) ** 2).mean(stat_dims(x))
    sigma_b = torch.sqrt(var_b + eps)
    sigma = torch.sqrt(rv + eps)
    with torch.set_grad_enabled(not detach and torch.is_grad_enabled()):
        r = torch.clamp(sigma_b / sigma, 1 / rmax, rmax)
        d = torch.clamp((mu - rm) / sigma, -dmax, dmax)
    x_hat = (x - mu.reshape(s)) / sigma_b.reshape(s)
    return (x_hat * r.reshape(s) + d.reshape(s)) * w.reshape(s) + b.reshape(s)


RENORM_CASES = [
    (BatchRenorm1d, (6, 3)),
    (BatchRenorm1d, (4, 3, 5)),
    (BatchRenorm2d, (4, 3, 5, 4)),
    (BatchRenorm3d, (2, 3, 3, 4, 2)),
]


def renorm_with_state(cls, c, seed=1, **kw):
    m = cls(c, dtype=D, **kw)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.weight.copy_(torch.rand(c, generator=gen, dtype=D) + 0.5)
        m.bias.copy_(torch.randn(c, generator=gen, dtype=D) * 0.2)
        m.running_mean.copy_(torch.randn(c, generator=gen, dtype=D))
        m.running_var.copy_(torch.rand(c, generator=gen, dtype=D) * 3 + 0.2)
    return m


@pytest.mark.parametrize("cls,shape", RENORM_CASES)
def test_renorm_train_formula_and_running_update(cls, shape):
    c = shape[1]
    # small rmax/dmax so some r and d are clamped and others are not
    m = renorm_with_state(cls, c, rmax=1.5, dmax=0.5, momentum=0.3).train()
    rm0, rv0 = m.running_mean.clone(), m.running_var.clone()
    x = randn(*shape, seed=2)
    sigma = torch.sqrt(rv0 + m.eps)
    r_raw = torch.sqrt(x.var(stat_dims(x), correction=0) + m.eps) / sigma
    d_raw = (x.mean(stat_dims(x)) - rm0) / sigma
    clamped = torch.cat([(r_raw < 1 / 1.5) | (r_raw > 1.5), d_raw.abs() > 0.5])
    assert clamped.any() and not clamped.all()  # both sides of the clamps are exercised
    want = renorm_reference(x, rm0, rv0, m.weight.detach(), m.bias.detach(), m.eps, 1.5, 0.5)
    got = m(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

    n = x.numel() // c
    mu = x.mean(stat_dims(x))
    var_unbiased = ((x - mu.reshape(bshape(x))) ** 2).sum(stat_dims(x)) / (n - 1)
    torch.testing.assert_close(m.running_mean, 0.7 * rm0 + 0.3 * mu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.running_var, 0.7 * rv0 + 0.3 * var_unbiased, rtol=1e-12, atol=1e-12)
    assert int(m.num_batches_tracked) == 1


@pytest.mark.parametrize("cls,shape", RENORM_CASES)
def test_renorm_eval_is_running_stats_affine(cls, shape):
    m = renorm_with_state(cls, shape[1]).eval()
    x = randn(*shape, seed=3)
    s = bshape(x)
    want = (x - m.running_mean.reshape(s)) / torch.sqrt(m.running_var.reshape(s) + m.eps) * m.weight.reshape(s) \
        + m.bias.reshape(s)
    before = [t.clone() for t in m.buffers()]
    torch.testing.assert_close(m(x), want, rtol=1e-12, atol=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(before, m.buffers()))  # eval updates nothing


def test_renorm_train_matches_eval_until_clamped():
    """Unclamped, r and d turn the batch statistics into the running ones: train output = eval output."""
    m = renorm_with_state(BatchRenorm2d, 3).train()  # rmax=3, dmax=5: nothing clamped for this batch
    x = randn(4, 3, 5, 4, seed=2)
    y_train = copy.deepcopy(m)(x)
    y_eval = copy.deepcopy(m).eval()(x)
    y_bn = F.batch_norm(x, None, None, m.weight, m.bias, True, 0.0, m.eps)
    torch.testing.assert_close(y_train, y_eval, rtol=1e-12, atol=1e-12)
    assert (y_train - y_bn).abs().max() > 1e-2  # unlike BatchNorm's train mode

    m.rmax, m.dmax = 1.5, 0.5
    y_clamped = copy.deepcopy(m)(x)
    assert (y_clamped - y_eval).abs().max() > 1e-2
    assert (y_clamped - y_bn).abs().max() > 1e-2


def test_renorm_r_and_d_carry_no_gradient():
    c = 3
    m = renorm_with_state(BatchRenorm2d, c, rmax=10.0, dmax=10.0).train()  # nothing clamped
    x = randn(4, c, 3, 3, seed=5, requires_grad=True)
    g = randn(4, c, 3, 3, seed=6)
    rm, rv = m.running_mean.clone(), m.running_var.clone()
    sigma = torch.sqrt(rv + m.eps)
    r = torch.sqrt(x.detach().var((0, 2, 3), correction=0) + m.eps) / sigma
    assert ((r - 1).abs() > 0.05).all() and (r < 10).all()

    def grads(y):
        return torch.autograd.grad((y * g).sum(), (x, m.weight, m.bias))

    got = grads(m(x))
    detached = grads(renorm_reference(x, rm, rv, m.weight, m.bias, m.eps, 10.0, 10.0, detach=True))
    through = grads(renorm_reference(x, rm, rv, m.weight, m.bias, m.eps, 10.0, 10.0, detach=False))
    for a, b in zip(got, detached):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert (got[0] - through[0]).abs().max() > 1e-3  # the input gradient would differ through r and d
    # (through r and d, the unclamped formula is just eval BN, whose input gradient is g·γ/σ)
    torch.testing.assert_close(through[0], g * (m.weight / sigma).reshape(1, -1, 1, 1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls,shape", [(BatchRenorm1d, (5, 2, 3)), (BatchRenorm2d, (3, 2, 2, 3)),
                                       (BatchRenorm3d, (2, 2, 2, 2, 2))])
def test_renorm_gradcheck(cls, shape):
    # gradcheck compares with finite differences of the whole function, in which r and d move with x.
    # They are constant only where clamped, so the running statistics put every r at rmax and every d at
    # ±dmax (a real renorm regime, not BN's r = 1, d = 0). Momentum 0 keeps them fixed across calls.
    c = shape[1]
    m = renorm_with_state(cls, c, rmax=2.0, dmax=1.0, momentum=0.0).train()
    x = randn(*shape, seed=7, requires_grad=True)
    with torch.no_grad():
        m.running_var.fill_(0.01)  # σ_B / σ ≈ 15 > rmax
        m.running_mean.copy_(x.mean(stat_dims(x)) + torch.tensor([5.0, -5.0], dtype=D)[:c])  # |d| ≈ 50 > dmax
    w = m.weight.detach().clone().requires_grad_()
    b = m.bias.detach().clone().requires_grad_()

    def f(x, w, b):
        return torch.func.functional_call(m, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, w, b))


def make_bn(kind, c):
    return {
        "1d": (nn.BatchNorm1d(c), (6, c, 4)),
        "2d": (nn.BatchNorm2d(c), (4, c, 5, 5)),
        "3d": (nn.BatchNorm3d(c), (2, c, 3, 4, 4)),
        "act": (BatchNormAct2d(c), (4, c, 5, 5)),
    }[kind]


@pytest.mark.parametrize("kind", ["1d", "2d", "3d", "act"])
def test_renorm_eval_bit_identical_to_source_bn(kind):
    torch.manual_seed(0)
    bn, shape = make_bn(kind, 6)
    trained_bn(bn, shape, seed=4)
    cls = {"1d": BatchRenorm1d, "2d": BatchRenorm2d, "3d": BatchRenorm3d, "act": BatchRenorm2d}[kind]
    m = cls.from_bn(bn)
    assert type(m) is cls
    assert not m.training
    x = torch.randn(shape) * 3 + 1
    y = m(x)
    if kind == "act":  # the caller carries the activation; the norm part is identical
        y = bn.drop(y)
        y = bn.act(y)
    assert torch.equal(y, bn(x))
    assert (y - x).abs().max() > 0.1  # the BN state is far from identity


def test_renorm_rmax1_dmax0_is_bn_in_training_and_stats_update_like_bn():
    torch.manual_seed(0)
    bn = trained_bn(nn.BatchNorm2d(4, dtype=D, momentum=0.2), (4, 4, 5, 5)).train()
    clamped = BatchRenorm2d.from_bn(bn, rmax=1.0, dmax=0.0)
    default = BatchRenorm2d.from_bn(bn)
    assert clamped.training and default.training and clamped.momentum == 0.2
    for step in range(3):
        x = randn(3, 4, 5, 5, seed=10 + step) * (1 + step)
        y_bn = bn(x)
        torch.testing.assert_close(clamped(x), y_bn, rtol=1e-12, atol=1e-12)
        default(x)
        for m in (clamped, default):  # r and d do not enter the statistics
            torch.testing.assert_close(m.running_mean, bn.running_mean, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(m.running_var, bn.running_var, rtol=1e-12, atol=1e-12)
            assert torch.equal(m.num_batches_tracked, bn.num_batches_tracked)


def test_renorm_from_bn_carries_everything():
    bn = trained_bn(nn.BatchNorm2d(5, eps=1e-3, momentum=0.05, dtype=D), (4, 5, 3, 3))
    bn.weight.requires_grad_(False)
    m = BatchRenorm2d.from_bn(bn, rmax=2.0, dmax=1.5)
    assert (m.eps, m.momentum, m.rmax, m.dmax, m.affine) == (1e-3, 0.05, 2.0, 1.5, True)
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(m, name), getattr(bn, name)), name
        assert getattr(m, name).dtype == getattr(bn, name).dtype
    assert not m.weight.requires_grad and m.bias.requires_grad
    assert m.weight.data_ptr() != bn.weight.data_ptr()
    assert "rmax=2.0" in repr(m) and "dmax=1.5" in repr(m)
    assert not m.training and BatchRenorm2d.from_bn(bn.train()).training

    # state dicts carry over both ways
    assert set(m.state_dict()) == set(bn.state_dict())
    fresh = nn.BatchNorm2d(5, dtype=D)
    fresh.load_state_dict(m.state_dict())
    BatchRenorm2d(5, dtype=D).load_state_dict(bn.state_dict())

    no_affine = trained_bn(nn.BatchNorm1d(3, affine=False), (4, 3))
    m = BatchRenorm1d.from_bn(no_affine)
    assert m.weight is None and not m.affine
    x = torch.randn(4, 3)
    assert torch.equal(m(x), no_affine(x))

    cumulative = nn.BatchNorm2d(3, momentum=None)
    assert BatchRenorm2d.from_bn(cumulative).momentum == 0.1


def test_renorm_from_bn_picks_and_checks_the_dimension():
    assert type(BatchRenorm1d.from_bn(nn.BatchNorm1d(3))) is BatchRenorm1d
    assert type(BatchRenorm3d.from_bn(nn.BatchNorm3d(3))) is BatchRenorm3d
    assert type(BatchRenorm2d.from_bn(BatchNormAct2d(3))) is BatchRenorm2d
    assert type(_BatchRenorm.from_bn(nn.BatchNorm3d(3))) is BatchRenorm3d
    with pytest.raises(ValueError, match="BatchRenorm2d"):
        BatchRenorm2d.from_bn(nn.BatchNorm1d(3))
    sync = nn.SyncBatchNorm(3)
    with pytest.raises(ValueError, match="dim="):
        _BatchRenorm.from_bn(sync)
    assert type(BatchRenorm2d.from_bn(sync)) is BatchRenorm2d
    assert type(_BatchRenorm.from_bn(sync, dim=3)) is BatchRenorm3d
    assert type(_BatchRenorm.from_bn(nn.BatchNorm1d(3))) is BatchRenorm1d
    with pytest.raises(ValueError, match="contradicts"):
        BatchRenorm2d.from_bn(sync, dim=3)
    with pytest.raises(TypeError, match="BatchNorm"):
        BatchRenorm2d.from_bn(nn.GroupNorm(1, 3))
    with pytest.raises(ValueError, match="track_running_stats"):
        BatchRenorm2d.from_bn(nn.BatchNorm2d(3, track_running_stats=False))


def test_renorm_is_not_a_batchnorm_and_checks_inputs():
    m = BatchRenorm2d(3)
    assert not isinstance(m, nn.modules.batchnorm._BatchNorm)
    assert family_of(m) is None and near_family_of(m) is None
    with pytest.raises(ValueError, match="4D input"):
        m(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="2D or 3D"):
        BatchRenorm1d(3)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="5D input"):
        BatchRenorm3d(3)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="channels"):
        m(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="more than 1 value"):
        BatchRenorm1d(3)(torch.randn(1, 3))
    with pytest.raises(ValueError, match="rmax"):
        BatchRenorm2d(3, rmax=0.5)


# ----------------------------------------------------------------------------------------------------------------
# IBN
# ----------------------------------------------------------------------------------------------------------------

def ibn_reference(x, m):
    """IN on channels [:half] with per-sample statistics; BN on the rest, by mode."""
    k = m.half
    a, b = x[:, :k], x[:, k:]
    mu_a = a.mean((2, 3), keepdim=True)
    var_a = a.var((2, 3), correction=0, keepdim=True)
    out_a = (a - mu_a) / torch.sqrt(var_a + m.IN.eps) * m.IN.weight.reshape(1, -1, 1, 1) + m.IN.bias.reshape(1, -1, 1, 1)
    if m.training:
        mu_b, var_b = b.mean((0, 2, 3)), b.var((0, 2, 3), correction=0)
    else:
        mu_b, var_b = m.BN.running_mean, m.BN.running_var
    out_b = (b - mu_b.reshape(1, -1, 1, 1)) / torch.sqrt(var_b.reshape(1, -1, 1, 1) + m.BN.eps) \
        * m.BN.weight.reshape(1, -1, 1, 1) + m.BN.bias.reshape(1, -1, 1, 1)
    return torch.cat([out_a, out_b], 1)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("c,ratio", [(6, 0.5), (5, 0.5), (8, 0.25)])
def test_ibn_formula(train, c, ratio):
    bn = trained_bn(nn.BatchNorm2d(c, dtype=D), (4, c, 4, 4))
    m = IBN.from_bn(bn, ratio=ratio).train(train)
    assert m.half == int(c * ratio)
    x = randn(3, c, 4, 5, seed=8)
    want = ibn_reference(x, m)
    torch.testing.assert_close(m(x), want, rtol=1e-12, atol=1e-12)


def test_ibn_from_bn_carries_params():
    bn = trained_bn(nn.BatchNorm2d(7, eps=1e-4, momentum=0.03, dtype=D), (4, 7, 3, 3)).train()
    m = IBN.from_bn(bn)
    k = 3
    assert m.half == k and m.ratio == 0.5 and m.training
    assert torch.equal(m.IN.weight, bn.weight[:k]) and torch.equal(m.IN.bias, bn.bias[:k])
    assert torch.equal(m.BN.weight, bn.weight[k:]) and torch.equal(m.BN.bias, bn.bias[k:])
    assert torch.equal(m.BN.running_mean, bn.running_mean[k:]) and torch.equal(m.BN.running_var, bn.running_var[k:])
    assert torch.equal(m.BN.num_batches_tracked, bn.num_batches_tracked)
    assert (m.IN.eps, m.BN.eps, m.BN.momentum) == (1e-4, 1e-4, 0.03)
    assert m.IN.affine and not m.IN.track_running_stats
    assert all(p.dtype == D for p in m.state_dict().values() if p.is_floating_point())
    assert IBN.from_bn(nn.BatchNorm2d(4, momentum=None)).BN.momentum is None


def test_ibn_eval_equals_in_concat_bn():
    torch.manual_seed(0)
    bn = trained_bn(nn.BatchNorm2d(8), (4, 8, 6, 6), seed=3)
    m = IBN.from_bn(bn)
    assert not m.training
    x = torch.randn(2, 8, 6, 6) * 2 + 0.5
    k = m.half
    inorm = nn.InstanceNorm2d(k, affine=True)
    with torch.no_grad():
        inorm.weight.copy_(bn.weight[:k])
        inorm.bias.copy_(bn.bias[:k])
    half_bn = nn.BatchNorm2d(8 - k).eval()
    half_bn.load_state_dict({"weight": bn.weight[k:], "bias": bn.bias[k:], "running_mean": bn.running_mean[k:],
                             "running_var": bn.running_var[k:], "num_batches_tracked": bn.num_batches_tracked})
    y = m(x)
    assert torch.equal(y, torch.cat([inorm(x[:, :k].contiguous()), half_bn(x[:, k:].contiguous())], 1))
    # the BN half computes what the original BN computed on those channels
    assert torch.equal(y[:, k:], bn(x)[:, k:])
    # and the IN half does not (per-image statistics)
    assert (y[:, :k] - bn(x)[:, :k]).abs().max() > 1e-2


def test_ibn_from_timm_bnact_and_errors():
    bnact = trained_bn(BatchNormAct2d(6), (4, 6, 3, 3))
    m = IBN.from_bn(bnact)
    assert type(m.BN) is nn.BatchNorm2d  # a plain BN: the activation stays with the caller
    x = torch.randn(2, 6, 3, 3)
    assert torch.equal(bnact.act(m(x))[:, 3:], bnact(x)[:, 3:])
    for c, ratio in [(4, 0.0), (4, 1.0), (1, 0.5), (3, 0.2)]:
        with pytest.raises(ValueError, match="ratio"):
            IBN(c, ratio=ratio)
    with pytest.raises(ValueError, match="ratio"):
        IBN.from_bn(nn.BatchNorm2d(1))
    with pytest.raises(ValueError, match="2d"):
        IBN.from_bn(nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="4D input"):
        IBN(4)(torch.randn(4, 3, 3))


def test_ibn_gradcheck():
    m = IBN(4, dtype=D).train()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = randn(2, 4, 3, 3, seed=9, requires_grad=True)
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]

    def f(x, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params))


# ----------------------------------------------------------------------------------------------------------------
# conditional norms
# ----------------------------------------------------------------------------------------------------------------

def random_tables(m, seed=11):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.weight.copy_(torch.rand(m.weight.shape, generator=gen, dtype=m.weight.dtype) + 0.5)
        m.bias.copy_(torch.randn(m.bias.shape, generator=gen, dtype=m.bias.dtype))
    return m


def cond_reference(x, m, y):
    """Normalize without affine (per-sample for IN; by mode for BN), then the γ/β rows y picks or mixes."""
    if isinstance(m, ConditionalInstanceNorm2d):
        mu = x.mean((2, 3), keepdim=True)
        var = x.var((2, 3), correction=0, keepdim=True)
    elif m.training:
        mu = x.mean((0, 2, 3), keepdim=True)
        var = x.var((0, 2, 3), correction=0, keepdim=True)
    else:
        mu, var = m.running_mean.reshape(1, -1, 1, 1), m.running_var.reshape(1, -1, 1, 1)
    if y.is_floating_point():
        gamma, beta = y @ m.weight, y @ m.bias
    else:
        gamma = torch.stack([m.weight[i] for i in y.tolist()])
        beta = torch.stack([m.bias[i] for i in y.tolist()])
    return (x - mu) / torch.sqrt(var + m.eps) * gamma[:, :, None, None] + beta[:, :, None, None]


def cond_layer(kind, c=3, k=4):
    if kind == "in":
        return random_tables(ConditionalInstanceNorm2d(c, k, dtype=D))
    m = random_tables(ConditionalBatchNorm2d(c, k, momentum=0.25, dtype=D))
    with torch.no_grad():
        m.running_mean.copy_(torch.randn(c, dtype=D))
        m.running_var.copy_(torch.rand(c, dtype=D) + 0.5)
    return m


@pytest.mark.parametrize("kind,train", [("in", True), ("in", False), ("bn", True), ("bn", False)])
def test_conditional_formula(kind, train):
    m = cond_layer(kind).train(train)
    x = randn(3, 3, 4, 4, seed=12)
    for y in (torch.tensor([2, 0, 2]), torch.tensor([[0.1, 0.2, 0.3, 0.4], [1.0, 0, 0, 0], [-0.5, 0, 1.5, 0]], dtype=D)):
        ref = copy.deepcopy(m)
        m.condition = y
        torch.testing.assert_close(m(x), cond_reference(x, ref, y), rtol=1e-12, atol=1e-12)


def test_conditional_bn_running_stats_update():
    m = cond_layer("bn").train()
    rm0, rv0 = m.running_mean.clone(), m.running_var.clone()
    x = randn(3, 3, 4, 4, seed=12)
    with conditioned(m, torch.tensor([0, 1, 2])):
        m(x)
    torch.testing.assert_close(m.running_mean, 0.75 * rm0 + 0.25 * x.mean((0, 2, 3)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.running_var, 0.75 * rv0 + 0.25 * x.var((0, 2, 3), correction=1), rtol=1e-12,
                               atol=1e-12)
    assert int(m.num_batches_tracked) == 1


@pytest.mark.parametrize("kind", ["in", "bn"])
def test_conditional_index_equals_one_hot_and_mixing_interpolates(kind):
    m = cond_layer(kind).eval()
    x = randn(3, 3, 4, 4, seed=13)
    idx = torch.tensor([3, 1, 1])
    with conditioned(m, idx):
        by_index = m(x)
    with conditioned(m, F.one_hot(idx, 4).to(D)):
        by_one_hot = m(x)
    torch.testing.assert_close(by_one_hot, by_index, rtol=1e-14, atol=1e-14)

    mix = torch.tensor([[0.25, 0.75, 0, 0]] * 3, dtype=D)
    with conditioned(m, mix):
        mixed = m(x)
    with conditioned(m, torch.zeros(3, dtype=torch.long)):
        y0 = m(x)
    with conditioned(m, torch.ones(3, dtype=torch.long)):
        y1 = m(x)
    torch.testing.assert_close(mixed, 0.25 * y0 + 0.75 * y1, rtol=1e-12, atol=1e-12)
    assert (y0 - y1).abs().max() > 1e-2  # the two styles differ


@pytest.mark.parametrize("cls", [ConditionalInstanceNorm2d, ConditionalBatchNorm2d])
def test_conditional_missing_or_bad_condition(cls):
    m = cls(3, 4)
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match=r"normswap\.layers\.set_condition\(model, y\)") as err:
        m(x)
    assert "normswap.layers.conditioned(model, y)" in str(err.value)
    bad = [
        (torch.tensor([0, 1, 2]), ValueError, "batch has 2 samples"),
        (torch.tensor([0, 4]), ValueError, r"\[0, 4\)"),
        (torch.tensor([-1, 0]), ValueError, r"\[0, 4\)"),
        (torch.ones(2, 3), ValueError, r"\(2, 4\)"),
        (torch.tensor([True, False]), TypeError, "integer"),
        (torch.tensor(1), ValueError, "scalar"),
        ([0, 1], TypeError, "tensor"),
    ]
    for cond, exc, msg in bad:
        m.condition = cond
        with pytest.raises(exc, match=msg):
            m(x)
    if cls is ConditionalBatchNorm2d:
        assert int(m.num_batches_tracked) == 0  # rejected calls leave the statistics alone


@pytest.mark.parametrize("train", [True, False])
def test_conditional_from_bn_equals_norm_with_original_affine(train):
    bn = trained_bn(nn.BatchNorm2d(5, eps=1e-3, momentum=0.07, dtype=D), (4, 5, 3, 3)).train(train)
    cin = ConditionalInstanceNorm2d.from_bn(bn, 6)
    cbn = ConditionalBatchNorm2d.from_bn(bn, 6)
    assert cin.training == cbn.training == train
    assert cin.weight.shape == (6, 5) and cin.weight.dtype == D
    assert (cin.eps, cbn.eps, cbn.momentum) == (1e-3, 1e-3, 0.07)
    assert torch.equal(cbn.running_mean, bn.running_mean) and torch.equal(cbn.running_var, bn.running_var)
    assert torch.equal(cbn.num_batches_tracked, bn.num_batches_tracked)
    x = randn(3, 5, 4, 4, seed=14)
    inorm = nn.InstanceNorm2d(5, eps=1e-3, affine=True, dtype=D)
    with torch.no_grad():
        inorm.weight.copy_(bn.weight)
        inorm.bias.copy_(bn.bias)
    bn_ref = copy.deepcopy(bn)
    want_bn = bn_ref(x)
    for y in (torch.tensor([5, 0, 3]), torch.tensor([[0.2, 0.3, 0.1, 0.1, 0.2, 0.1]] * 3, dtype=D)):
        for m in (cin, cbn):
            m.condition = y
        torch.testing.assert_close(cin(x), inorm(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(cbn(x), want_bn, rtol=1e-12, atol=1e-12)
    if train:  # the carried statistics keep updating like the BN's (two calls above, one on bn_ref)
        bn_ref(x)
        torch.testing.assert_close(cbn.running_mean, bn_ref.running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(cbn.running_var, bn_ref.running_var, rtol=1e-12, atol=1e-12)


def test_conditional_from_bn_variants():
    bnact = trained_bn(BatchNormAct2d(4), (4, 4, 3, 3))
    m = ConditionalBatchNorm2d.from_bn(bnact, 2)
    x = torch.randn(2, 4, 3, 3)
    with conditioned(m, torch.tensor([1, 0])):
        torch.testing.assert_close(bnact.act(m(x)), bnact(x), rtol=1e-6, atol=1e-6)
    plain = ConditionalInstanceNorm2d.from_bn(nn.BatchNorm2d(4, affine=False, track_running_stats=False), 3)
    assert torch.equal(plain.weight, torch.ones(3, 4)) and torch.equal(plain.bias, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="track_running_stats"):
        ConditionalBatchNorm2d.from_bn(nn.BatchNorm2d(4, track_running_stats=False), 3)
    with pytest.raises(ValueError, match="2d"):
        ConditionalInstanceNorm2d.from_bn(nn.BatchNorm1d(4), 3)
    frozen = nn.BatchNorm2d(4)
    frozen.bias.requires_grad_(False)
    m = ConditionalBatchNorm2d.from_bn(frozen, 3)
    assert m.weight.requires_grad and not m.bias.requires_grad


class TinyGenerator(nn.Module):
    """Two conditional norms in one model, conditioned together."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.norm1 = ConditionalBatchNorm2d(4, 5)
        self.conv2 = nn.Conv2d(4, 3, 3, padding=1)
        self.norm2 = ConditionalInstanceNorm2d(3, 5)

    def forward(self, x):
        return self.norm2(self.conv2(torch.relu(self.norm1(self.conv1(x)))))


def test_set_condition_and_context_manager_restore():
    torch.manual_seed(0)
    g = TinyGenerator().eval()
    for m in (g.norm1, g.norm2):
        random_tables(m)
    x = torch.randn(2, 3, 6, 6)
    a, b = torch.tensor([0, 1]), torch.tensor([4, 4])
    assert set_condition(g, a) == 2
    assert g.norm1.condition is a and g.norm2.condition is a
    out_a = g(x)
    with conditioned(g, b) as same:
        assert same is g and g.norm1.condition is b and g.norm2.condition is b
        out_b = g(x)
    assert g.norm1.condition is a and g.norm2.condition is a
    assert torch.equal(g(x), out_a)
    assert (out_a - out_b).abs().max() > 1e-3
    with pytest.raises(KeyError):
        with conditioned(g, b):
            raise KeyError("boom")
    assert g.norm1.condition is a and g.norm2.condition is a
    set_condition(g, None)
    with conditioned(g, a):
        g(x)
    assert g.norm1.condition is None and g.norm2.condition is None
    with pytest.raises(RuntimeError, match="set_condition"):
        g(x)
    with pytest.raises(ValueError, match="no conditional"):
        set_condition(nn.Sequential(nn.Conv2d(3, 3, 1)), a)
    with pytest.raises(ValueError, match="no conditional"):
        with conditioned(nn.Sequential(nn.Conv2d(3, 3, 1)), a):
            pass


@pytest.mark.parametrize("kind", ["in", "bn"])
def test_conditional_gradcheck(kind):
    m = cond_layer(kind, c=2, k=3).train()
    x = randn(3, 2, 2, 3, seed=15, requires_grad=True)
    w = m.weight.detach().clone().requires_grad_()
    b = m.bias.detach().clone().requires_grad_()
    mix = torch.tensor([[0.2, 0.5, 0.3], [1.0, 0.0, 0.0], [0.1, 0.1, 0.8]], dtype=D, requires_grad=True)

    def f(x, w, b, cond):
        m.condition = cond
        return torch.func.functional_call(m, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, w, b, mix))
    index = torch.tensor([2, 0, 2])
    assert torch.autograd.gradcheck(lambda x, w, b: f(x, w, b, index), (x, w, b))
