"""Tests for bvvit.quant.packing."""


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bvvit.quant.packing import from_unsigned, pack_bits, packed_numel, to_unsigned, unpack_bits
from bvvit.quant.primitives import qrange

WIDTHS = list(range(1, 17))


@settings(max_examples=150, deadline=None)
@given(bits=st.sampled_from(WIDTHS), n=st.integers(0, 67), seed=st.integers(0, 2**31 - 1), shape2d=st.booleans())
def test_round_trip_bit_exact(bits, n, seed, shape2d):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 1 << bits, (n,), generator=g, dtype=torch.int32)
    if shape2d and n % 3 == 0:
        q = q.reshape(3, -1)  # any shape packs in row-major order
    packed = pack_bits(q, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == (n * bits + 7) // 8 == packed_numel(n, bits)
    out = unpack_bits(packed, bits, n)
    assert out.dtype == torch.int32
    assert torch.equal(out, q.reshape(-1))


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("n", [0, 1, 2, 7, 8, 9, 1001])
def test_round_trip_extremes_and_sizes(bits, n):
    top = (1 << bits) - 1
    q = torch.tensor([0, top] * (n // 2) + [top] * (n % 2), dtype=torch.int64)
    packed = pack_bits(q, bits)
    assert packed.numel() == -(-n * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, n), q.to(torch.int32))


@pytest.mark.parametrize("bits", WIDTHS)
def test_bit_stream_matches_reference(bits):
    q = torch.randint(0, 1 << bits, (29,), generator=torch.Generator().manual_seed(bits))
    stream = "".join(format(int(v), f"0{bits}b")[::-1] for v in q)  # LSB first per value
    stream += "0" * (-len(stream) % 8)
    expected = [int(stream[i : i + 8][::-1], 2) for i in range(0, len(stream), 8)]
    assert pack_bits(q, bits).tolist() == expected


def test_known_byte_layouts():
    # 4-bit: first value in the low nibble
    assert pack_bits(torch.tensor([1, 2, 3]), 4).tolist() == [0x21, 0x03]
    assert pack_bits(torch.tensor([0xA, 0xB, 0xC, 0xD]), 4).tolist() == [0xBA, 0xDC]
    # 2-bit: four per byte, little-endian
    assert pack_bits(torch.tensor([1, 2, 3, 0, 3]), 2).tolist() == [0b00111001, 0b11]
    # 6-bit: four values in three bytes
    assert pack_bits(torch.tensor([63, 0, 0, 0]), 6).tolist() == [0x3F, 0x00, 0x00]
    assert pack_bits(torch.tensor([0, 0, 0, 63]), 6).tolist() == [0x00, 0x00, 0xFC]
    # 8-bit: plain bytes; 16-bit: little-endian byte pairs
    assert pack_bits(torch.tensor([7, 255]), 8).tolist() == [7, 255]
    assert pack_bits(torch.tensor([0x1234]), 16).tolist() == [0x34, 0x12]
    assert pack_bits(torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1]), 1).tolist() == [0b1101, 1]


@pytest.mark.parametrize("bits", [1, 3, 4, 8, 16])
def test_out_of_range_and_bad_inputs_raise(bits):
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([0, 1 << bits]), bits)
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([-1, 0]), bits)
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([0.0, 1.0]), bits)
    packed = pack_bits(torch.tensor([1, 1, 1]), bits)
    with pytest.raises(ValueError):
        unpack_bits(packed, bits, 3 + 8)  # too few bytes
    with pytest.raises(ValueError):
        unpack_bits(packed.to(torch.int32), bits, 3)


@pytest.mark.parametrize("bits", [0, 17])
def test_bad_width_raises(bits):
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([0]), bits)
    with pytest.raises(ValueError):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), bits, 1)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_signed_values_via_offset(bits):
    qmin, qmax = qrange(bits, signed=True)
    q = torch.arange(qmin, qmax + 1, dtype=torch.int32).repeat(3)
    packed = pack_bits(to_unsigned(q, qmin), bits)
    assert torch.equal(from_unsigned(unpack_bits(packed, bits, q.numel()), qmin), q)
    with pytest.raises(ValueError):
        pack_bits(q, bits)  # signed values must be offset first


def test_ten_million_values_round_trip():
    # vectorised packing handles model-sized tensors (speed is not asserted here: shared,
    # noisy CI cores; it takes well under a second on a quiet machine)
    q = torch.randint(0, 16, (10_000_000,), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = pack_bits(q, 4)
    assert packed.numel() == 5_000_000
    assert torch.equal(unpack_bits(packed, 4, q.numel()), q)
