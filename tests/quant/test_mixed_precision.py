import pytest

from bvvit.errors import ConfigError
from bvvit.quant.mixed_precision import allocate_bits, damage_table

PARAMS = {"a": 1000, "b": 1000, "c": 1000, "d": 4000}
DAMAGE = {"a": {4: 5.0, 6: 0.5}, "b": {4: 0.01, 6: 0.001}, "c": {4: 0.2, 6: 0.02}, "d": {4: 0.3, 6: 0.05}}


@pytest.mark.parametrize("avg", [4.0, 4.5, 5.0, 6.0, 7.0, 8.0])
def test_budget_is_respected(avg):
    alloc = allocate_bits(DAMAGE, PARAMS, [4, 6, 8], avg_bits=avg)
    assert alloc.avg_bits <= avg + 1e-9
    assert set(alloc.bits.values()) <= {4, 6, 8}


def test_sensitive_layers_get_bits_first():
    alloc = allocate_bits(DAMAGE, PARAMS, [4, 6, 8], avg_bits=4.5)
    assert alloc.bits["a"] > 4  # by far the most sensitive per parameter
    assert alloc.bits["b"] == 4  # insensitive: stays low
    assert alloc.overrides()[0].startswith("a=")


def test_more_budget_never_hurts():
    damages = [allocate_bits(DAMAGE, PARAMS, [4, 6, 8], avg_bits=b).damage for b in (4, 5, 6, 7, 8)]
    assert damages == sorted(damages, reverse=True)


def test_byte_budget_and_errors():
    alloc = allocate_bits(DAMAGE, PARAMS, [4, 8], max_weight_bytes=4000)
    assert alloc.weight_bytes <= 4000
    with pytest.raises(ConfigError):
        allocate_bits(DAMAGE, PARAMS, [4, 8], avg_bits=3.0)
    with pytest.raises(ConfigError):
        allocate_bits(DAMAGE, PARAMS, [4, 8])


def test_damage_table_sums_targets():
    rows = [{"layer": "x", "bits": 4, "kl_div": 0.5, "target": "weights"},
            {"layer": "x", "bits": 4, "kl_div": 0.25, "target": "activations"}]
    assert damage_table(rows) == {"x": {4: 0.75}}
