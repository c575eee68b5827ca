"""Coding schedules: tiny pure functions shared by training and decoding.

A schedule splits the L = w*w positions of a window into S groups (coding steps):
  * group sizes say how many tokens each step uncovers (power law or MaskGIT cosine);
  * a location order says which positions come first (QLDS, raster, seeded random).
Group i is then order[sum(sizes[:i]) : sum(sizes[:i+1])].

Invariants (checked by `schedule`): sizes are positive, sum to L, and the order is a
permutation of range(L). Everything here is deterministic and uses only Python ints/floats,
so encoder and decoder always derive the same schedule.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

PLASTIC_NUMBER = 1.32471795724474602596  # g of Roberts' R2 sequence


def powerlaw_group_sizes(num_tokens: int, num_steps: int, alpha: float) -> list[int]:
    """Sizes whose cumulative count after step s is floor(L * (s/S)**alpha), each at least 1.

    For L = 576, S = 12, alpha = 2.2: [2, 9, 16, 24, 32, 42, 50, 61, 69, 80, 90, 101].
    """
    _check_counts(num_tokens, num_steps)
    cumulative = [math.floor(num_tokens * (s / num_steps) ** alpha) for s in range(1, num_steps + 1)]
    cumulative[-1] = num_tokens
    return _sizes_from_cumulative(cumulative, num_tokens)


def cosine_group_sizes(num_tokens: int, num_steps: int) -> list[int]:
    """MaskGIT's cosine schedule: after step s, ceil(L * cos(pi/2 * s/S)) tokens stay masked."""
    _check_counts(num_tokens, num_steps)
    cumulative = [
        num_tokens - math.ceil(num_tokens * math.cos(math.pi / 2 * s / num_steps))
        for s in range(1, num_steps + 1)
    ]
    cumulative[-1] = num_tokens
    return _sizes_from_cumulative(cumulative, num_tokens)


def _check_counts(num_tokens: int, num_steps: int) -> None:
    if num_steps < 1 or num_tokens < num_steps:
        raise ValueError(f"need 1 <= num_steps <= num_tokens, got S={num_steps}, L={num_tokens}")


def _sizes_from_cumulative(cumulative: list[int], num_tokens: int) -> list[int]:
    # Force every step to uncover at least one token while keeping the total at L:
    # step s may not end before s tokens, nor later than L - (S - s).
    steps = len(cumulative)
    fixed = []
    for s, c in enumerate(cumulative, start=1):
        c = max(c, s, (fixed[-1] + 1) if fixed else 1)
        c = min(c, num_tokens - (steps - s))
        fixed.append(c)
    sizes = [b - a for a, b in zip([0] + fixed[:-1], fixed)]
    assert sum(sizes) == num_tokens and min(sizes) >= 1
    return sizes


def qlds_order(window: int) -> list[int]:
    """Quantised low-discrepancy sequence (R2) over a window x window grid, as flat indices.

    Point n -> (frac(0.5 + n/g), frac(0.5 + n/g**2)), scaled to the grid; cells already
    taken are skipped. Each prefix is spread evenly over the window.
    """
    num_cells = window * window
    a1, a2 = 1.0 / PLASTIC_NUMBER, 1.0 / PLASTIC_NUMBER**2
    taken = [False] * num_cells
    order: list[int] = []
    n = 0
    # R2 hits every cell eventually; the cap only guards against float pathologies.
    while len(order) < num_cells and n < 1000 * num_cells:
        x = (0.5 + a1 * n) % 1.0
        y = (0.5 + a2 * n) % 1.0
        col, row = int(x * window), int(y * window)
        cell = row * window + col
        if not taken[cell]:
            taken[cell] = True
            order.append(cell)
        n += 1
    order.extend(c for c in range(num_cells) if not taken[c])
    return order


def raster_order(window: int) -> list[int]:
    return list(range(window * window))


def random_order(window: int, seed: int) -> list[int]:
    order = list(range(window * window))
    random.Random(seed).shuffle(order)
    return order


def group_sizes(kind: str, num_tokens: int, num_steps: int, alpha: float) -> list[int]:
    if kind == "powerlaw":
        return powerlaw_group_sizes(num_tokens, num_steps, alpha)
    if kind == "cosine":
        return cosine_group_sizes(num_tokens, num_steps)
    raise ValueError(f"unknown group-size schedule {kind!r} (known: powerlaw, cosine)")


def location_order(kind: str, window: int, seed: int = 0) -> list[int]:
    if kind == "qlds":
        return qlds_order(window)
    if kind == "raster":
        return raster_order(window)
    if kind == "random":
        return random_order(window, seed)
    raise ValueError(f"unknown location order {kind!r} (known: qlds, raster, random)")


@dataclass(frozen=True)
class Schedule:
    """A window's coding schedule: `groups[i]` lists the flat positions coded at step i."""

    window: int
    sizes: tuple[int, ...]
    order: tuple[int, ...]

    @property
    def num_steps(self) -> int:
        return len(self.sizes)

    @property
    def groups(self) -> list[tuple[int, ...]]:
        out, start = [], 0
        for size in self.sizes:
            out.append(self.order[start : start + size])
            start += size
        return out

    def step_of_position(self) -> list[int]:
        """For each flat position, the step at which it is coded."""
        steps = [0] * (self.window * self.window)
        for i, group in enumerate(self.groups):
            for pos in group:
                steps[pos] = i
        return steps


def schedule(window: int, num_steps: int, alpha: float, sizes_kind: str = "powerlaw",
             order_kind: str = "qlds", seed: int = 0) -> Schedule:
    num_tokens = window * window
    sizes = group_sizes(sizes_kind, num_tokens, num_steps, alpha)
    order = location_order(order_kind, window, seed)
    assert sorted(order) == list(range(num_tokens)), "location order must be a permutation"
    return Schedule(window=window, sizes=tuple(sizes), order=tuple(order))
