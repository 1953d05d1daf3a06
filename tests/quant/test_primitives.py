"""Tests for bvvit.quant.primitives: bit-exactness vs torch, properties, granularity."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bvvit.metrics import sqnr_db
from bvvit.quant.primitives import (
    PerChannel,
    PerGroup,
    PerTensor,
    QParams,
    choose_qparams,
    dequantize,
    fake_quantize,
    fake_quantize_tensor,
    from_groups,
    granularity_from_dict,
    granularity_to_dict,
    qrange,
    quantize,
    reduce_minmax,
    to_groups,
    to_rows,
)

BITS = list(range(2, 17))
FAST = settings(max_examples=40, deadline=None)
TORCH_EPS = torch.finfo(torch.float32).eps


def _weight(seed: int, shape=(16, 48), scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale


def _with_ties(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Append values at exact half steps to exercise round-half-to-even."""
    k = torch.arange(-6, 6, dtype=torch.float32)
    return torch.cat([x.flatten(), ((k + 0.5) * scale.flatten()[0]).flatten()])


# ------------------------------------------------------------------ ranges and qparams


def test_qrange_values():
    assert qrange(8, signed=True) == (-128, 127)
    assert qrange(8, signed=False) == (0, 255)
    assert qrange(4, signed=True) == (-8, 7)
    assert qrange(2, signed=False) == (0, 3)
    assert qrange(16, signed=True) == (-32768, 32767)


@pytest.mark.parametrize("bits", [0, 1, 17, 32])
def test_qrange_rejects_bad_bits(bits):
    with pytest.raises(ValueError, match="must be between 2 and 16"):  # the one bit-range check
        qrange(bits, signed=True)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_choose_qparams_matches_torch_minmax_observer(bits):
    from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

    x = _weight(bits, (8, 40)) + 0.3
    for symmetric in (True, False):
        qmin, qmax = qrange(bits, symmetric)
        dtype = torch.qint8 if symmetric else torch.quint8
        qscheme = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
        obs = MinMaxObserver(dtype=dtype, qscheme=qscheme, quant_min=qmin, quant_max=qmax)
        obs(x)
        ref_scale, ref_zp = obs.calculate_qparams()
        scale, zp = choose_qparams(*reduce_minmax(x, PerTensor()), bits, symmetric, eps=TORCH_EPS)
        assert torch.equal(scale.reshape(1), ref_scale)
        assert torch.equal(zp.reshape(1).long(), ref_zp.long())

        qscheme = torch.per_channel_symmetric if symmetric else torch.per_channel_affine
        obs = PerChannelMinMaxObserver(ch_axis=0, dtype=dtype, qscheme=qscheme, quant_min=qmin, quant_max=qmax)
        obs(x)
        ref_scale, ref_zp = obs.calculate_qparams()
        scale, zp = choose_qparams(*reduce_minmax(x, PerChannel(0)), bits, symmetric, eps=TORCH_EPS)
        assert torch.equal(scale.flatten(), ref_scale)
        assert torch.equal(zp.flatten().long(), ref_zp.long())


def test_choose_qparams_asymmetric_range_contains_zero():
    scale, zp = choose_qparams(torch.tensor(0.5), torch.tensor(2.0), 8, symmetric=False)
    assert zp.item() == 0  # min widened to 0
    assert scale.item() == pytest.approx(2.0 / 255)
    scale, zp = choose_qparams(torch.tensor(-3.0), torch.tensor(-1.0), 8, symmetric=False)
    assert zp.item() == 255  # max widened to 0
    assert zp.dtype == torch.int32


def test_choose_qparams_symmetric_formula_and_eps():
    scale, zp = choose_qparams(torch.tensor(-1.0), torch.tensor(3.0), 4, symmetric=True)
    assert scale.item() == pytest.approx(3.0 / 7.5)
    assert zp.item() == 0
    scale, _ = choose_qparams(torch.tensor(0.0), torch.tensor(0.0), 8, symmetric=True, eps=1e-6)
    assert scale.item() == pytest.approx(1e-6)


# ------------------------------------------------------------------ bit-exact vs torch


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", BITS)
def test_fake_quantize_per_tensor_bit_exact_vs_torch(bits, symmetric):
    x = _weight(bits, (32, 24), scale=2.0)
    qmin, qmax = qrange(bits, symmetric)
    # a range narrower than the data, so clamping and the STE mask are exercised
    scale, zp = choose_qparams(torch.tensor(-1.5), torch.tensor(2.5), bits, symmetric)
    x = _with_ties(x, scale).requires_grad_(True)
    ref_x = x.detach().clone().requires_grad_(True)

    out = fake_quantize(x, scale, zp, qmin, qmax)
    ref = torch.fake_quantize_per_tensor_affine(ref_x, scale.item(), int(zp), qmin, qmax)
    assert torch.equal(out, ref)
    out.backward(torch.ones_like(out))
    ref.backward(torch.ones_like(ref))
    assert torch.equal(x.grad, ref_x.grad)
    assert 0 < x.grad.sum() < x.numel()  # both inside and outside present


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", BITS)
def test_fake_quantize_per_channel_bit_exact_vs_torch(bits, symmetric):
    w = _weight(100 + bits, (12, 40))
    w[0] = 0.0  # a dead channel hits the eps clamp
    qmin, qmax = qrange(bits, symmetric)
    scale, zp = choose_qparams(*reduce_minmax(w, PerChannel(0)), bits, symmetric)
    assert scale.shape == (12, 1)
    out = fake_quantize(w, scale, zp, qmin, qmax)
    ref = torch.fake_quantize_per_channel_affine(w, scale.flatten(), zp.flatten(), 0, qmin, qmax)
    assert torch.equal(out, ref)

    # channels on the last axis of an activation, narrower range than the data
    a = _weight(200 + bits, (2, 5, 8))
    scale, zp = choose_qparams(*reduce_minmax(a * 0.5, PerChannel(-1)), bits, symmetric)
    assert scale.shape == (1, 1, 8)
    out = fake_quantize(a, scale, zp, qmin, qmax)
    ref = torch.fake_quantize_per_channel_affine(a, scale.flatten(), zp.flatten(), 2, qmin, qmax)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_quantize_then_dequantize_equals_torch_fake_quantize(bits, symmetric):
    x = _weight(7, (10, 10))
    qmin, qmax = qrange(bits, symmetric)
    scale, zp = choose_qparams(*reduce_minmax(x * 0.7, PerTensor()), bits, symmetric)
    q = quantize(x, scale, zp, qmin, qmax)
    assert q.dtype == torch.int32
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    assert {qmin, qmax} <= set(q.unique().tolist())  # clamped at both ends
    ref = torch.fake_quantize_per_tensor_affine(x, scale.item(), int(zp), qmin, qmax)
    assert torch.equal(dequantize(q, scale, zp), ref)


# ------------------------------------------------------------------ properties


@st.composite
def _range_and_data(draw):
    low = draw(st.floats(-100.0, 0.0))
    width = draw(st.floats(1e-3, 200.0))
    seed = draw(st.integers(0, 2**31 - 1))
    n = draw(st.integers(1, 300))
    g = torch.Generator().manual_seed(seed)
    x = low + width * torch.rand(n, generator=g)
    return torch.tensor(low), torch.tensor(low + width), x


@FAST
@given(data=_range_and_data(), bits=st.sampled_from(BITS), symmetric=st.booleans())
def test_error_at_most_half_step_inside_range(data, bits, symmetric):
    min_val, max_val, x = data
    qmin, qmax = qrange(bits, symmetric)
    scale, zp = choose_qparams(min_val, max_val, bits, symmetric)
    lo = (qmin - zp.float()) * scale
    hi = (qmax - zp.float()) * scale
    inside = (x >= lo) & (x <= hi)
    err = (x - fake_quantize(x, scale, zp, qmin, qmax)).abs()
    tol = scale * 0.5 * (1 + 1e-5) + 1e-6 * x.abs()
    assert bool((err[inside] <= tol[inside] if tol.dim() else err[inside] <= tol).all())
    # every value of the calibrated range is inside or within half a step of it
    in_calibrated = (x >= min_val) & (x <= max_val)
    assert bool((err[in_calibrated] <= scale * 0.5 * (1 + 1e-5) + 1e-6 * x.abs()[in_calibrated]).all())


@FAST
@given(
    low=st.floats(-50.0, 0.0),
    width=st.floats(0.01, 100.0),
    seed=st.integers(0, 2**31 - 1),
    symmetric=st.booleans(),
)
def test_mse_non_increasing_with_bits(low, width, seed, symmetric):
    # Data fill the range actually quantized (widened to contain 0; mirrored when
    # symmetric).  Data confined to a sliver of one step can do better at fewer bits.
    min_val, max_val = torch.tensor(low), torch.tensor(low + width)
    lo, hi = min(low, 0.0), max(low + width, 0.0)
    if symmetric:
        lo, hi = -max(-lo, hi), max(-lo, hi)
    g = torch.Generator().manual_seed(seed)
    x = lo + (hi - lo) * torch.rand(2000, generator=g)
    errors = []
    for bits in BITS:
        scale, zp = choose_qparams(min_val, max_val, bits, symmetric)
        qmin, qmax = qrange(bits, symmetric)
        errors.append(float(((x - fake_quantize(x, scale, zp, qmin, qmax)) ** 2).mean()))
    for coarse, fine in zip(errors, errors[1:]):
        assert fine <= coarse * (1 + 1e-4) + 1e-12


@FAST
@given(
    bits=st.sampled_from(BITS),
    symmetric=st.booleans(),
    log_scale=st.floats(-12.0, 6.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_grid_values_round_trip_exactly(bits, symmetric, log_scale, seed):
    qmin, qmax = qrange(bits, symmetric)
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor(2.0**log_scale, dtype=torch.float32)
    zp = torch.randint(qmin, qmax + 1, (), generator=g, dtype=torch.int32) if not symmetric else torch.tensor(0)
    q = torch.randint(qmin, qmax + 1, (64,), generator=g, dtype=torch.int32)
    x = dequantize(q, scale, zp)
    assert torch.equal(quantize(x, scale, zp, qmin, qmax), q)
    assert torch.equal(fake_quantize(x, scale, zp, qmin, qmax), x)


@FAST
@given(bits=st.sampled_from(BITS), symmetric=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_ste_gradient_ones_inside_zeros_outside(bits, symmetric, seed):
    qmin, qmax = qrange(bits, symmetric)
    scale, zp = choose_qparams(torch.tensor(-1.0), torch.tensor(1.0), bits, symmetric)
    lo = float((qmin - zp) * scale)
    hi = float((qmax - zp) * scale)
    g = torch.Generator().manual_seed(seed)
    inside = lo + (hi - lo) * torch.rand(50, generator=g)
    outside = torch.cat([hi + scale + torch.rand(25, generator=g), lo - scale - torch.rand(25, generator=g)])
    x = torch.cat([inside, outside]).requires_grad_(True)
    fake_quantize(x, scale, zp, qmin, qmax).sum().backward()
    assert torch.equal(x.grad, torch.cat([torch.ones(50), torch.zeros(50)]))


def test_fake_quantize_keeps_dtype_and_rejects_oversized_qparams():
    x = torch.randn(4, 6, dtype=torch.bfloat16)
    scale, zp = choose_qparams(*reduce_minmax(x.float(), PerChannel(0)), 8, True)
    assert fake_quantize(x, scale, zp, -128, 127).dtype == torch.bfloat16
    with pytest.raises(ValueError):
        fake_quantize(torch.randn(6), scale, zp, -128, 127)


# ------------------------------------------------------------------ per-group


def test_group_helpers_shapes_and_round_trip():
    w = _weight(3, (6, 32))
    g = PerGroup(8)
    assert to_groups(w, g).shape == (6, 4, 8)
    assert torch.equal(from_groups(to_groups(w, g), g), w)
    assert torch.equal(to_groups(w, g)[2, 1], w[2, 8:16])  # consecutive elements
    min_val, max_val = reduce_minmax(w, g)
    assert min_val.shape == max_val.shape == (6, 4, 1)
    assert torch.equal(max_val[2, 1, 0], w[2, 8:16].max())
    g0 = PerGroup(3, axis=0)
    assert to_groups(w, g0).shape == (2, 3, 32)
    assert torch.equal(from_groups(to_groups(w, g0), g0), w)
    rows, stat_shape = to_rows(w, g)
    assert rows.shape == (24, 8) and stat_shape == (6, 4, 1)
    assert torch.equal(rows.amax(1).reshape(stat_shape), max_val)


def test_per_group_reduce_other_dims_for_activations():
    a = _weight(4, (2, 3, 16))  # (B, N, C)
    g = PerGroup(4)
    min_val, max_val = reduce_minmax(a, g, reduce_other_dims=True)
    assert min_val.shape == max_val.shape == (1, 1, 4, 1)
    per_group = a.reshape(-1, 4, 4).transpose(0, 1).reshape(4, -1)  # (groups, B*N*4)
    assert torch.equal(max_val.flatten(), per_group.amax(1))
    assert torch.equal(min_val.flatten(), per_group.amin(1))
    rows, stat_shape = to_rows(a, g, reduce_other_dims=True)
    assert rows.shape == (4, 24) and stat_shape == (1, 1, 4, 1)
    assert torch.equal(rows.amax(1).reshape(stat_shape), max_val)
    # the same qparams serve any batch shape
    qp = QParams(*choose_qparams(min_val, max_val, 8, True), 8, True, g)
    assert qp.fake_quantize(_weight(5, (7, 1, 16))).shape == (7, 1, 16)
    # PerTensor / PerChannel ignore the flag
    for granularity in (PerTensor(), PerChannel(-1)):
        assert torch.equal(reduce_minmax(a, granularity, True)[1], reduce_minmax(a, granularity)[1])


def test_per_group_rejects_non_divisible_and_bad_size():
    with pytest.raises(ValueError):
        to_groups(torch.zeros(4, 30), PerGroup(8))
    with pytest.raises(ValueError):
        PerGroup(0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_per_group_error_bound(bits, symmetric):
    w = _weight(bits, (8, 64))
    g = PerGroup(16)
    qp = QParams(*choose_qparams(*reduce_minmax(w, g), bits, symmetric), bits, symmetric, g)
    assert qp.scale.shape == (8, 4, 1)
    out = qp.fake_quantize(w)
    assert out.shape == w.shape
    step = from_groups(qp.scale.expand(8, 4, 16), g)
    assert bool(((w - out).abs() <= step * 0.5 * (1 + 1e-5) + 1e-6 * w.abs()).all())
    assert torch.equal(qp.dequantize(qp.quantize(w)), out)
    # smaller groups fit the data more tightly than one range per row
    qc = QParams(*choose_qparams(*reduce_minmax(w, PerChannel(0)), bits, symmetric), bits, symmetric, PerChannel(0))
    assert sqnr_db(w, out) >= sqnr_db(w, qc.fake_quantize(w))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_per_group_equals_per_channel_when_one_group_per_row(bits, symmetric):
    w = _weight(bits, (8, 24))
    g = PerGroup(24)
    qg = QParams(*choose_qparams(*reduce_minmax(w, g), bits, symmetric), bits, symmetric, g)
    qc = QParams(*choose_qparams(*reduce_minmax(w, PerChannel(0)), bits, symmetric), bits, symmetric, PerChannel(0))
    assert torch.equal(qg.fake_quantize(w), qc.fake_quantize(w))
    assert torch.equal(qg.quantize(w), qc.quantize(w))


def test_fake_quantize_tensor_per_group_has_ste_gradient():
    w = _weight(5, (4, 16)).requires_grad_(True)
    g = PerGroup(4)
    scale, zp = choose_qparams(*reduce_minmax(w.detach() * 0.5, g), 4, True)
    fake_quantize_tensor(w, scale, zp, -8, 7, g).sum().backward()
    assert w.grad.shape == w.shape
    assert 0 < w.grad.sum() < w.numel()


# ------------------------------------------------------------------ serialisation


@pytest.mark.parametrize("granularity", [PerTensor(), PerChannel(0), PerChannel(-1), PerGroup(32, -1), PerGroup(4, 0)])
def test_granularity_dict_round_trip(granularity):
    data = json.loads(json.dumps(granularity_to_dict(granularity)))
    assert granularity_from_dict(data) == granularity
    with pytest.raises(ValueError):
        granularity_from_dict({"type": "per_block"})


@pytest.mark.parametrize("granularity", [PerTensor(), PerChannel(0), PerGroup(8)])
@pytest.mark.parametrize("bits", [3, 8])
def test_qparams_json_round_trip_is_exact(granularity, bits):
    w = _weight(11, (5, 16)) * 0.0123
    qp = QParams(*choose_qparams(*reduce_minmax(w, granularity), bits, False), bits, False, granularity)
    back = QParams.from_dict(json.loads(json.dumps(qp.to_dict())))
    assert torch.equal(back.scale, qp.scale) and back.scale.dtype == torch.float32
    assert torch.equal(back.zero_point, qp.zero_point) and back.zero_point.dtype == torch.int32
    assert (back.bits, back.symmetric, back.granularity) == (bits, False, granularity)
    assert (back.qmin, back.qmax) == qrange(bits, False)
    assert torch.equal(back.fake_quantize(w), qp.fake_quantize(w))
