"""Mixed precision: per-layer bit-widths under a budget, chosen from per-layer sensitivity.

Input: for each weight layer, its parameter count and the damage (e.g. output KL vs FP32
from :func:`bvvit.evaluate.sensitivity.sensitivity`) of quantizing it alone at each
candidate width. Every layer starts at the lowest width; the solver then repeatedly gives
more bits to the layer whose damage falls most per extra weight bit, as long as the budget
holds (a greedy knapsack: optimal when damage is convex in the bits spent, close to it
otherwise). The budget is the parameter-weighted average weight width (``--avg-bits``) or
the packed weight bytes (``--max-weight-bytes``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from bvvit.errors import ConfigError


@dataclass
class Allocation:
    bits: dict[str, int]
    avg_bits: float
    weight_bytes: int
    damage: float
    base_bits: int
    upgrades: list[str] = field(default_factory=list)  # in the order the solver chose them

    def overrides(self) -> list[str]:
        """``layer=bits`` for every layer above the base width (paste into --override)."""
        return [f"{layer}={b}" for layer, b in self.bits.items() if b != self.base_bits]

    def to_dict(self) -> dict:
        return {"bits": self.bits, "avg_bits": self.avg_bits, "weight_bytes": self.weight_bytes,
                "damage": self.damage, "base_bits": self.base_bits, "overrides": self.overrides(),
                "upgrades": self.upgrades}


def _damage(table: dict[int, float], bits: int, top: int) -> float:
    if bits in table:
        return float(table[bits])
    return 0.0 if bits >= top else math.inf


def allocate_bits(damage: dict[str, dict[int, float]], params: dict[str, int], candidates: list[int],
                  avg_bits: Optional[float] = None, max_weight_bytes: Optional[int] = None) -> Allocation:
    """Choose a width from ``candidates`` for every layer of ``params`` under the budget.

    ``damage[layer][bits]``: damage of that layer alone at ``bits`` (missing for the widest
    candidate means 0). Exactly one of ``avg_bits`` / ``max_weight_bytes`` must be given.
    """
    if (avg_bits is None) == (max_weight_bytes is None):
        raise ConfigError("give exactly one budget: --avg-bits or --max-weight-bytes")
    widths = sorted(set(candidates))
    if not widths or not params:
        raise ConfigError("mixed precision needs candidate widths and weight layers")
    total_params = sum(params.values())
    budget_bits = avg_bits * total_params if avg_bits is not None else max_weight_bytes * 8
    base = widths[0]
    if base * total_params > budget_bits + 1e-9:
        raise ConfigError(f"the budget is below {base} bits per weight for every layer; raise it or "
                          f"add a lower width to the candidates")
    top = widths[-1]
    bits = {layer: base for layer in params}
    used = base * total_params
    upgrades = []
    while True:
        best, best_gain = None, -math.inf
        for layer, current in bits.items():
            if current == top:
                continue
            nxt = widths[widths.index(current) + 1]
            cost = params[layer] * (nxt - current)
            if used + cost > budget_bits + 1e-9:
                continue
            table = damage.get(layer, {})
            gain = (_damage(table, current, top) - _damage(table, nxt, top)) / cost
            if gain > best_gain:
                best, best_gain = (layer, nxt, cost), gain
        if best is None or best_gain <= 0:
            break
        layer, nxt, cost = best
        bits[layer] = nxt
        used += cost
        upgrades.append(f"{layer}={nxt}")
    total_damage = sum(_damage(damage.get(layer, {}), b, top) for layer, b in bits.items())
    return Allocation(bits, used / total_params, int(math.ceil(used / 8)), total_damage, base, upgrades)


def damage_table(rows: list[dict]) -> dict[str, dict[int, float]]:
    """Sensitivity rows -> ``{layer: {bits: damage}}``, damage = KL of weights + activations."""
    table: dict[str, dict[int, float]] = {}
    for row in rows:
        kl = float(row["kl_div"])
        per_layer = table.setdefault(row["layer"], {})
        per_layer[int(row["bits"])] = per_layer.get(int(row["bits"]), 0.0) + kl
    return table
