"""Tests for bvvit.quant.observers."""

import pytest
import torch

from bvvit.quant.observers import (
    OBSERVERS,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    PercentileObserver,
    _row_quantile,
    make_observer,
)
from bvvit.quant.primitives import PerChannel, PerGroup, PerTensor, choose_qparams, reduce_minmax


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _student_t(seed: int, n: int, df: float = 2.0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.distributions.StudentT(df).sample((n,))


def _mse(x: torch.Tensor, qp) -> float:
    return float(((x - qp.fake_quantize(x)) ** 2).mean())


# ------------------------------------------------------------------ min-max


def test_minmax_exact_values_over_batches():
    obs = MinMaxObserver()
    obs.update(torch.tensor([0.5, -1.0, 2.0]))
    obs.update(torch.tensor([[3.0, 0.0]]))
    obs.update(torch.empty(0))  # ignored
    assert obs.min_val.item() == -1.0 and obs.max_val.item() == 3.0
    qp = obs.compute_qparams(8)
    scale, zp = choose_qparams(torch.tensor(-1.0), torch.tensor(3.0), 8, symmetric=False)
    assert torch.equal(qp.scale, scale) and torch.equal(qp.zero_point, zp)
    assert (qp.qmin, qp.qmax, qp.bits, qp.symmetric) == (0, 255, 8, False)


def test_minmax_per_channel_activations_any_batch_shape():
    obs = MinMaxObserver(granularity=PerChannel(-1), symmetric=True)
    a, b = _randn(0, 2, 5, 8), _randn(1, 3, 7, 8)
    obs.update(a)
    obs.update(b)
    both = torch.cat([a.reshape(-1, 8), b.reshape(-1, 8)])
    assert obs.min_val.shape == (1, 1, 8)
    assert torch.equal(obs.min_val.flatten(), both.amin(0))
    assert torch.equal(obs.max_val.flatten(), both.amax(0))
    qp = obs.compute_qparams(4)
    assert qp.scale.shape == (1, 1, 8) and bool((qp.zero_point == 0).all())
    assert qp.fake_quantize(a).shape == a.shape


@pytest.mark.parametrize("name", sorted(OBSERVERS))
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_per_channel_weight_shapes(name, bits):
    w = _randn(2, 12, 20)
    obs = make_observer(name, granularity=PerChannel(0), symmetric=True)
    obs.update(w)
    qp = obs.compute_qparams(bits)
    assert qp.scale.shape == qp.zero_point.shape == (12, 1)
    assert qp.granularity == PerChannel(0) and qp.bits == bits
    assert qp.fake_quantize(w).shape == w.shape


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_per_group_weight_shapes_and_shape_change(name):
    w = _randn(3, 6, 32)
    obs = make_observer(name, granularity=PerGroup(8))
    obs.update(w)
    qp = obs.compute_qparams(4)
    assert qp.scale.shape == (6, 4, 1)
    assert qp.fake_quantize(w).shape == w.shape
    with pytest.raises(ValueError):
        obs.update(_randn(4, 5, 32))


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_per_group_activations_shared_across_tokens(name):
    a, b = _randn(5, 2, 5, 16), _randn(6, 3, 7, 16)
    obs = make_observer(name, granularity=PerGroup(4), reduce_other_dims=True)
    obs.update(a)
    obs.update(b)  # another batch shape is fine
    qp = obs.compute_qparams(8)
    assert qp.scale.shape == (1, 1, 4, 1)
    assert qp.fake_quantize(a).shape == a.shape and qp.fake_quantize(b).shape == b.shape
    if name == "minmax":
        both = torch.cat([a.reshape(-1, 16), b.reshape(-1, 16)])
        assert torch.equal(obs.max_val.flatten(), both.reshape(-1, 4, 4).amax(dim=(0, 2)))


def test_ema_matches_torch_moving_average_observer():
    from torch.ao.quantization.observer import MovingAverageMinMaxObserver as TorchEMA

    ref = TorchEMA(averaging_constant=0.1, dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    obs = MovingAverageMinMaxObserver(averaging_constant=0.1, symmetric=False)
    for seed in range(5):
        x = _randn(seed, 64) * (seed + 1)
        ref(x)
        obs.update(x)
    assert obs.min_val.item() == pytest.approx(ref.min_val.item(), rel=1e-6)
    assert obs.max_val.item() == pytest.approx(ref.max_val.item(), rel=1e-6)
    ref_scale, ref_zp = ref.calculate_qparams()
    qp = obs.compute_qparams(8)
    assert qp.scale.item() == pytest.approx(ref_scale.item(), rel=1e-6)
    assert abs(qp.zero_point.item() - ref_zp.item()) <= 1


def test_ema_first_batch_sets_range():
    obs = MovingAverageMinMaxObserver(averaging_constant=0.5)
    obs.update(torch.tensor([-2.0, 2.0]))
    obs.update(torch.tensor([0.0, 4.0]))
    assert obs.min_val.item() == -1.0 and obs.max_val.item() == 3.0


# ------------------------------------------------------------------ percentile


@pytest.mark.parametrize("q", [0.0, 0.001, 0.37, 0.5, 0.9, 0.999, 1.0])
@pytest.mark.parametrize("m", [1, 2, 997, 40000])
def test_row_quantile_matches_torch_quantile(q, m):
    rows = _randn(m, 3, m)
    assert torch.allclose(_row_quantile(rows, q), torch.quantile(rows, q, dim=1), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("symmetric", [True, False])
def test_percentile_inside_minmax_and_robust_to_an_outlier(symmetric):
    x = _randn(5, 20000)
    x[123] = 1000.0
    pct = PercentileObserver(percentile=99.9, symmetric=symmetric)
    mm = MinMaxObserver(symmetric=symmetric)
    pct.update(x)
    mm.update(x)
    lo, hi = pct._minmax(8)
    assert mm.min_val <= lo <= hi <= mm.max_val
    assert hi < 5.0  # the outlier does not set the range
    assert _mse(x[x < 100], pct.compute_qparams(8)) < _mse(x[x < 100], mm.compute_qparams(8)) / 100


def test_percentile_tails_and_batch_average():
    x = torch.arange(10001, dtype=torch.float32) - 5000.0  # -5000 .. 5000
    obs = PercentileObserver(percentile=99.0)
    obs.update(x)
    obs.update(x * 3)
    lo, hi = obs._minmax(8)
    assert lo.item() == pytest.approx(-4900.0 * 2) and hi.item() == pytest.approx(4900.0 * 2)
    sym = PercentileObserver(percentile=99.0, symmetric=True)
    sym.update(x - 1000.0)  # |x| quantile, mirrored
    lo, hi = sym._minmax(8)
    assert lo.item() == -hi.item() and hi.item() == pytest.approx(torch.quantile((x - 1000.0).abs(), 0.99).item())


def test_percentile_handles_tensors_above_torch_quantile_limit():
    x = _randn(9, 2**24 + 5)
    obs = PercentileObserver(percentile=99.99, symmetric=True)
    obs.update(x)
    _, hi = obs._minmax(8)
    assert 3.5 < hi.item() < 4.2  # 99.99th percentile of |N(0, 1)| is about 3.89


# ------------------------------------------------------------------ MSE


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("df, seed", [(2.0, 0), (2.0, 1), (3.0, 0), (3.0, 1)])
def test_mse_beats_minmax_on_heavy_tails(symmetric, df, seed):
    x = _student_t(seed, 10000, df=df)
    mse = MSEObserver(symmetric=symmetric)
    mm = MinMaxObserver(symmetric=symmetric)
    mse.update(x)
    mm.update(x)
    err_mse, err_mm = _mse(x, mse.compute_qparams(4)), _mse(x, mm.compute_qparams(4))
    assert err_mse <= err_mm
    if df >= 3.0:  # with df=2 a single huge outlier leaves the alpha grid little room
        assert err_mse < 0.5 * err_mm


def test_mse_per_channel_weights_never_worse_than_minmax_per_channel():
    w = torch.stack([_student_t(s, 64, df=1.5 + s) for s in range(16)])  # (16, 64)
    mse = MSEObserver(granularity=PerChannel(0), symmetric=True)
    mm = MinMaxObserver(granularity=PerChannel(0), symmetric=True)
    mse.update(w)
    mm.update(w)
    q_mse, q_mm = mse.compute_qparams(4), mm.compute_qparams(4)
    err_mse = ((w - q_mse.fake_quantize(w)) ** 2).sum(1)
    err_mm = ((w - q_mm.fake_quantize(w)) ** 2).sum(1)
    assert bool((err_mse <= err_mm).all())
    assert bool((q_mse.scale <= q_mm.scale).all())


def test_mse_uniform_data_keeps_about_full_range():
    x = torch.linspace(-1, 1, 4001)
    obs = MSEObserver(symmetric=True)
    obs.update(x)
    lo, hi = obs._minmax(8)
    assert hi.item() >= 0.97 and lo.item() == -hi.item()


def test_mse_reservoir_is_bounded_and_deterministic():
    batches = [_randn(s, 4, 50, 8) for s in range(6)]  # 1200 values per channel
    observers = [MSEObserver(granularity=PerChannel(-1), max_samples_per_row=256) for _ in range(2)]
    for obs in observers:
        for b in batches:
            obs.update(b)
    a, b = observers
    assert a.reservoir.shape == (8, 256)
    assert torch.equal(a.reservoir, b.reservoir)
    all_values = torch.cat([t.reshape(-1, 8) for t in batches]).T  # (8, 1200)
    assert bool(torch.isin(a.reservoir, all_values).all())
    # later batches made it into the sample (reservoir sampling, not just the first fill)
    assert bool(torch.isin(a.reservoir, batches[-1]).any())
    qa, qb = a.compute_qparams(4), b.compute_qparams(4)
    assert torch.equal(qa.scale, qb.scale) and torch.equal(qa.zero_point, qb.zero_point)
    a.reset()
    for batch in batches:
        a.update(batch)
    assert torch.equal(a.reservoir, b.reservoir)
    # min / max stay exact beyond the sample
    assert torch.equal(a.max_val.flatten(), all_values.amax(1))


def test_mse_total_sample_budget_splits_across_rows():
    obs = MSEObserver(granularity=PerChannel(-1), max_samples_per_row=1000, max_total_samples=800)
    obs.update(_randn(0, 100, 16))
    assert obs.reservoir.shape == (16, 50)


def test_mse_reservoir_draws_scale_with_its_capacity_not_with_the_values_seen(monkeypatch):
    """A ViT-B softmax is 30M values a batch: one random number per value was most of the
    calibration time; the sample's draws must stay O(capacity) per update."""
    drawn = []
    for name in ("rand", "randint", "randperm"):
        original = getattr(torch, name)

        def recording(*args, _original=original, **kwargs):
            out = _original(*args, **kwargs)
            drawn.append(out.numel())
            return out
        monkeypatch.setattr(torch, name, recording)
    obs = MSEObserver(granularity=PerTensor(), max_samples_per_row=1000)
    for seed in range(4):
        obs.update(_randn(seed, 100_000))
    assert obs.reservoir.shape == (1, 1000)
    assert max(drawn) <= 8 * 1000


def test_mse_reservoir_is_a_uniform_sample_of_every_batch():
    """Each batch holds its share of the kept sample (batch i is filled with value i)."""
    obs = MSEObserver(granularity=PerTensor(), max_samples_per_row=2000)
    for i in range(10):
        obs.update(torch.full((5000,), float(i)))
    counts = torch.bincount(obs.reservoir.reshape(-1).long(), minlength=10)
    assert int(counts.sum()) == 2000
    assert int(counts.min()) >= 120 and int(counts.max()) <= 280  # 200 each, binomial noise


def test_mse_search_in_row_chunks_matches_the_reference_search():
    """The chunked in-place search gives exactly the qparams of the plain formula."""
    from bvvit.quant.primitives import fake_quantize, qrange
    weight = _randn(3, 300, 700) * 0.02  # 300 rows x 700 values: several row chunks
    obs = MSEObserver(granularity=PerChannel(0), symmetric=True, num_candidates=40)
    obs.update(weight)
    for bits in (3, 8):
        qmin, qmax = qrange(bits, True)
        best = []
        for row in range(weight.shape[0]):
            lo, hi = obs.min_val[row], obs.max_val[row]
            errors = []
            for k in range(40, 0, -1):
                scale, zp = choose_qparams(k / 40 * lo, k / 40 * hi, bits, True)
                errors.append(float(((weight[row] - fake_quantize(weight[row], scale, zp, qmin, qmax)) ** 2)
                                    .sum(dtype=torch.float64)))
            best.append((40 - min(range(40), key=lambda i: (errors[i], i))) / 40)
        lo, hi = obs._minmax(bits)
        expected = torch.tensor(best, dtype=torch.float32).reshape(lo.shape)
        assert torch.equal(lo, expected * obs.min_val) and torch.equal(hi, expected * obs.max_val)


# ------------------------------------------------------------------ common behaviour


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_observers_are_explicit_and_deterministic(name):
    obs = make_observer(name)
    with pytest.raises(RuntimeError):
        obs.compute_qparams(8)
    x = _randn(1, 4, 10, 6).requires_grad_(True)
    obs.update(x)  # no autograd graph is recorded
    first = obs.compute_qparams(8)
    assert not first.scale.requires_grad
    obs.reset()
    with pytest.raises(RuntimeError):
        obs.compute_qparams(8)
    obs.update(x)
    second = obs.compute_qparams(8)
    assert torch.equal(first.scale, second.scale) and torch.equal(first.zero_point, second.zero_point)
    with pytest.raises(ValueError):
        obs.compute_qparams(1)


def test_make_observer_registry():
    assert isinstance(make_observer("minmax"), MinMaxObserver)
    assert isinstance(make_observer("ema_minmax", averaging_constant=0.2), MovingAverageMinMaxObserver)
    assert make_observer("percentile", percentile=99.0).percentile == 99.0
    assert make_observer("mse", num_candidates=10, granularity=PerChannel(0)).num_candidates == 10
    with pytest.raises(ValueError, match="ema_minmax, minmax, mse, percentile"):
        make_observer("histogram")


def test_observer_matches_reduce_minmax_for_single_update():
    w = _randn(6, 8, 16)
    for granularity in (PerTensor(), PerChannel(0), PerChannel(1), PerGroup(4)):
        obs = MinMaxObserver(granularity=granularity)
        obs.update(w)
        ref_min, ref_max = reduce_minmax(w, granularity)
        assert torch.equal(obs.min_val, ref_min) and torch.equal(obs.max_val, ref_max)
