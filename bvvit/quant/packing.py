"""Dense bit-packing of unsigned integer tensors for compact weight files.

Element ``i`` of a ``bits``-wide stream occupies stream bits ``[i*bits, (i+1)*bits)``,
least significant bit first, and stream bit ``k`` is bit ``k % 8`` of byte ``k // 8``
(little-endian bit order).  So 4-bit values ``[1, 2, 3]`` pack to bytes
``[0x21, 0x03]``; 6-bit values take four per three bytes; 8-bit values are plain bytes.
A stream of ``n`` values is exactly ``ceil(n * bits / 8)`` bytes; unused high bits of
the last byte are 0.

Signed quantized values are offset first: ``pack_bits(to_unsigned(q, qmin), bits)`` and
``from_unsigned(unpack_bits(packed, bits, n), qmin)``.

Both directions are vectorised: the stream repeats every ``lcm(bits, 8)`` bits, so
values are laid out as rows of one repeat and each byte column is built from at most
three shifted value columns (a Python loop over <= 8 columns, never over elements).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["pack_bits", "unpack_bits", "packed_numel", "to_unsigned", "from_unsigned"]


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an int in 1..16, got {bits!r}")


def packed_numel(numel: int, bits: int) -> int:
    """Bytes needed for ``numel`` values of ``bits`` bits: ``ceil(numel * bits / 8)``."""
    _check_bits(bits)
    return (numel * bits + 7) // 8


def to_unsigned(q: Tensor, qmin: int) -> Tensor:
    """Offset quantized values so that ``qmin`` becomes 0 (int32)."""
    return q.to(torch.int32) - qmin


def from_unsigned(u: Tensor, qmin: int) -> Tensor:
    """Inverse of :func:`to_unsigned` (int32)."""
    return u.to(torch.int32) + qmin


def _layout(bits: int) -> tuple[int, int]:
    """(values, bytes) in one repeat of the bit stream."""
    values_per_block = 8 // math.gcd(bits, 8)
    return values_per_block, values_per_block * bits // 8


def pack_bits(q: Tensor, bits: int) -> Tensor:
    """Pack unsigned integers in ``[0, 2^bits)`` into a 1-D uint8 tensor (row-major order).

    ``q`` may have any shape and integer dtype; the result has
    ``ceil(q.numel() * bits / 8)`` bytes.  Raises ValueError for a float dtype or a
    value out of range.
    """
    _check_bits(bits)
    if q.dtype.is_floating_point or q.dtype.is_complex or q.dtype == torch.bool:
        raise ValueError(f"pack_bits needs an integer tensor, got {q.dtype}")
    n = q.numel()
    if n == 0:
        return torch.empty(0, dtype=torch.uint8, device=q.device)
    low, high = torch.aminmax(q.reshape(-1))
    if int(low) < 0 or int(high) >= (1 << bits):
        raise ValueError(f"values must be in [0, {1 << bits}) for {bits}-bit packing, got [{int(low)}, {int(high)}]")

    values_per_block, bytes_per_block = _layout(bits)
    num_blocks = -(-n // values_per_block)
    flat = q.reshape(-1).to(torch.int32)
    pad = num_blocks * values_per_block - n
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    blocks = flat.view(num_blocks, values_per_block)  # (blocks, values_per_block)

    byte_columns: list[Tensor | None] = [None] * bytes_per_block
    for j in range(values_per_block):
        bit_offset = j * bits
        shifted = blocks[:, j] << (bit_offset % 8)  # < 2^23, fits int32
        first_byte = bit_offset // 8
        for k in range(((bit_offset % 8) + bits + 7) // 8):
            part = (shifted >> (8 * k)) & 0xFF
            col = byte_columns[first_byte + k]
            byte_columns[first_byte + k] = part if col is None else col | part
    packed = torch.stack(byte_columns, dim=1).to(torch.uint8)  # type: ignore[arg-type]
    return packed.reshape(-1)[: packed_numel(n, bits)]


def unpack_bits(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_bits`: a 1-D int32 tensor of ``numel`` values.

    Raises ValueError when ``packed`` is not uint8 or not exactly
    ``ceil(numel * bits / 8)`` bytes long.
    """
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed data must be uint8, got {packed.dtype}")
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    expected = packed_numel(numel, bits)
    if packed.numel() != expected:
        raise ValueError(f"{numel} values of {bits} bits need {expected} bytes, got {packed.numel()}")
    if numel == 0:
        return torch.empty(0, dtype=torch.int32, device=packed.device)

    values_per_block, bytes_per_block = _layout(bits)
    num_blocks = -(-numel // values_per_block)
    flat = packed.reshape(-1).to(torch.int32)
    pad = num_blocks * bytes_per_block - expected
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    blocks = flat.view(num_blocks, bytes_per_block)  # (blocks, bytes_per_block)

    mask = (1 << bits) - 1
    value_columns = []
    for j in range(values_per_block):
        bit_offset = j * bits
        first_byte = bit_offset // 8
        word = blocks[:, first_byte]
        for k in range(1, ((bit_offset % 8) + bits + 7) // 8):
            word = word | (blocks[:, first_byte + k] << (8 * k))
        value_columns.append((word >> (bit_offset % 8)) & mask)
    values = torch.stack(value_columns, dim=1)  # (blocks, values_per_block)
    return values.reshape(-1)[:numel]
