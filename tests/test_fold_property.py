"""Properties on random conv/linear/BN graphs (1-3 d, transposed, grouped, strided, dilated, reused modules,
multi-user outputs): folding never changes the output, and no recipe raises anything but NormswapError.

``NORMSWAP_FUZZ_EXAMPLES=5000`` runs the long version (docs/ARCHITECTURE.md has the figures)."""
import os

import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings, strategies as st

import normswap
from normswap.testing import randomize_bn

EXAMPLES = int(os.environ.get("NORMSWAP_FUZZ_EXAMPLES", "200"))
C = 4
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


@st.composite
def conv_spec(draw):
    transposed = draw(st.booleans())
    k = draw(st.sampled_from([1, 3]))
    groups = draw(st.sampled_from([1, 2, C]))
    bias = draw(st.booleans())
    dilation = 1 if transposed else draw(st.sampled_from([1, 2]))
    stride = 1 if transposed else draw(st.sampled_from([1, 1, 2]))
    return (transposed, k, groups, bias, dilation, stride)


@st.composite
def program(draw):
    dim = draw(st.sampled_from([1, 2, 3]))
    convs = draw(st.lists(conv_spec(), min_size=1, max_size=4))
    n_bn = draw(st.integers(1, 4))
    steps = draw(st.lists(st.tuples(
        st.integers(0, len(convs) - 1),          # which conv (repeats = reuse)
        st.integers(-1, n_bn - 1),                # which BN after it (-1: none)
        st.sampled_from(["plain", "skip", "bn_first", "relu"]),
    ), min_size=1, max_size=6))
    head = draw(st.booleans())  # pool -> linear -> BatchNorm1d
    return dim, convs, n_bn, steps, head


class RandomNet(nn.Module):
    def __init__(self, dim, convs, n_bn, steps, head):
        super().__init__()
        self.convs = nn.ModuleList()
        for transposed, k, groups, bias, dilation, stride in convs:
            if transposed:
                self.convs.append(CONVT[dim](C, C, k, padding=k // 2, groups=groups, bias=bias))
            else:
                self.convs.append(CONV[dim](C, C, k, padding=dilation * (k // 2), dilation=dilation, groups=groups,
                                            bias=bias, stride=stride))
        self.bns = nn.ModuleList(BN[dim](C) for _ in range(n_bn))
        self.steps = steps
        self.head = nn.Sequential(nn.Linear(C, 6), nn.BatchNorm1d(6)) if head else None

    def forward(self, x):
        for ci, bi, kind in self.steps:
            if kind == "bn_first" and bi >= 0:
                x = self.convs[ci](self.bns[bi](x))
                continue
            y = self.convs[ci](x)
            z = self.bns[bi](y) if bi >= 0 else y
            if kind == "skip":
                z = z + y  # y has a second user
            elif kind == "relu":
                z = torch.relu(z)
            x = z
        if self.head is not None:
            x = self.head(x.mean(dim=tuple(range(2, x.ndim))))
        return x


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(program(), st.integers(0, 2**16))
def test_fold_never_changes_the_output(prog, seed):
    dim = prog[0]
    shape = (3, C) + (5,) * dim
    torch.manual_seed(seed)
    model = RandomNet(*prog)
    randomize_bn(model, shape, seed=seed)
    model = model.eval().double()
    try:
        folded, report = normswap.fold(model, input_size=shape, check=False, return_report=True)
    except normswap.NormswapError:
        return  # a clear refusal is allowed; anything else is a bug and fails the test
    x = torch.randn(*shape, dtype=torch.float64)
    with torch.no_grad():
        ref, out = model(x), folded(x)
    err = ((ref - out).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
    assert err <= 1e-9, (err, report.changes, report.skipped)


RECIPES = [("bn_to_gn", {}), ("bn_to_in", {}), ("bn_to_ln", {}), ("bn_to_frozen", {}), ("bn_to_renorm", {}),
           ("bn_to_evonorm", {}), ("bn_to_frn", {}), ("sync_bn", {}), ("spectral_norm", {}), ("weight_norm", {}),
           ("cosine_norm", {}), ("fold_bn", {"into_next": True, "unfoldable": "affine"}), ("bn_to_cin", {"num_styles": 2})]


@settings(max_examples=EXAMPLES // 4, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(program(), st.integers(0, 2**16), st.sampled_from(RECIPES), st.booleans())
def test_recipes_raise_only_normswap_errors(prog, seed, recipe, inplace):
    dim = prog[0]
    shape = (3, C) + (5,) * dim
    torch.manual_seed(seed)
    model = randomize_bn(RandomNet(*prog), shape, seed=seed).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    name, params = recipe
    try:
        out = normswap.apply(model, name, input_size=shape, inplace=inplace, **params)
    except normswap.NormswapError:
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        return
    from normswap.layers import set_condition

    if name == "bn_to_cin" and any("Conditional" in type(m).__name__ for m in out.modules()):
        set_condition(out, torch.zeros(shape[0], dtype=torch.long))  # one style per sample
    with torch.no_grad():
        y = out(torch.randn(*shape))
    assert torch.isfinite(y).all(), name
