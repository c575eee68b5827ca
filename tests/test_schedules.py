"""Coding schedules (group sizes, location orders) and the M2T slot layout built from them."""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning (must be set before torch is imported; a
# value set by the user wins). On a shared 2-core machine a spinning 2-thread torch runs
# the codec's many small ops up to ~30x slower; how work is split between threads, and so
# every number computed, is unchanged (checked: identical bitstreams either way).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import math
import random

import numpy as np
import pytest
import torch

from m2t_core import ConfigError, ModelConfig
from m2t_core import schedules as sch
from m2t_core import M2TCodec
from m2t_core import network as N

# ----------------------------------------------------------------------------- group sizes

PAPER_SIZES = [2, 9, 16, 24, 32, 42, 50, 61, 69, 80, 90, 101]


def test_powerlaw_paper_setting():
    sizes = sch.powerlaw_group_sizes(576, 12, 2.2)
    assert sizes == PAPER_SIZES
    # The paper's definition: tokens uncovered after step s = floor(L * (s/S)**alpha).
    cumulative = np.cumsum(sizes).tolist()
    assert cumulative == [math.floor(576 * (s / 12) ** 2.2) for s in range(1, 12)] + [576]
    assert sch.group_sizes("powerlaw", 576, 12, 2.2) == PAPER_SIZES


def _sizes_cases():
    rng = random.Random(1234)
    cases = [(1, 1, 2.2), (2, 2, 2.2), (5, 5, 0.3), (64, 12, 2.2), (64, 64, 2.2), (256, 12, 2.2),
             (576, 2, 2.2), (576, 4, 1.0), (576, 8, 3.0), (576, 576, 2.2), (100, 99, 5.0),
             (1024, 12, 0.5), (7, 3, 10.0), (576, 12, 0.01), (576, 12, 50.0)]
    for _ in range(60):
        L = rng.randint(1, 2000)
        cases.append((L, rng.randint(1, min(L, 40)), rng.choice([0.2, 0.7, 1.0, 1.5, 2.2, 3.3, 8.0])))
    return cases


@pytest.mark.parametrize("kind", ["powerlaw", "cosine"])
def test_group_sizes_positive_and_sum_to_L(kind):
    for L, S, alpha in _sizes_cases():
        sizes = sch.group_sizes(kind, L, S, alpha)
        assert len(sizes) == S, (kind, L, S, alpha)
        assert all(isinstance(n, int) and n >= 1 for n in sizes), (kind, L, S, alpha, sizes)
        assert sum(sizes) == L, (kind, L, S, alpha, sizes)


def test_powerlaw_grows_for_alpha_above_one():
    # alpha > 1: later steps uncover more tokens (the paper's "alpha > 1 is crucial").
    for L, S in [(576, 12), (256, 12), (576, 8), (1024, 4)]:
        sizes = sch.powerlaw_group_sizes(L, S, 2.2)
        assert sizes[0] < sizes[-1]
        assert sizes[-1] == max(sizes)


def test_cosine_sizes_known_values():
    # MaskGIT: after step s, ceil(L cos(pi/2 s/S)) tokens remain masked.
    L, S = 576, 12
    sizes = sch.cosine_group_sizes(L, S)
    remaining = [L - c for c in np.cumsum(sizes).tolist()]
    assert remaining == [math.ceil(L * math.cos(math.pi / 2 * s / S)) for s in range(1, S)] + [0]
    assert sizes[0] < sizes[-1]


@pytest.mark.parametrize("L,S", [(10, 0), (10, 11), (0, 1), (5, -1)])
@pytest.mark.parametrize("kind", ["powerlaw", "cosine"])
def test_group_sizes_reject_impossible_counts(kind, L, S):
    with pytest.raises(ValueError):
        sch.group_sizes(kind, L, S, 2.2)


def test_unknown_schedule_names_raise():
    with pytest.raises(ValueError):
        sch.group_sizes("linear", 576, 12, 2.2)
    with pytest.raises(ValueError):
        sch.location_order("zigzag", 24)
    with pytest.raises(ValueError):
        sch.schedule(8, 12, 2.2, sizes_kind="exp")
    with pytest.raises(ValueError):
        sch.schedule(8, 12, 2.2, order_kind="hilbert")
    # The config rejects them too (ConfigError is a ValueError).
    with pytest.raises(ValueError):
        ModelConfig(group_sizes="linear")
    with pytest.raises(ConfigError):
        ModelConfig(location_order="zigzag")
    with pytest.raises(ConfigError):
        ModelConfig(mode="vct")


# ----------------------------------------------------------------------------- location orders

WINDOWS = [1, 2, 3, 4, 5, 7, 8, 16, 24, 31]


@pytest.mark.parametrize("kind", ["qlds", "raster", "random"])
def test_orders_are_deterministic_permutations(kind):
    for w in WINDOWS:
        a = sch.location_order(kind, w, seed=3)
        b = sch.location_order(kind, w, seed=3)
        assert a == b
        assert sorted(a) == list(range(w * w)), (kind, w)
        assert all(isinstance(c, int) for c in a)


def test_raster_order():
    assert sch.raster_order(4) == list(range(16))


def test_random_order_depends_on_seed():
    a = sch.random_order(16, 0)
    assert a == sch.random_order(16, 0)
    assert a != sch.random_order(16, 1)
    assert a != sch.raster_order(16)
    assert sch.location_order("random", 16, seed=5) == sch.random_order(16, 5)
    # The seed is honoured through the config too.
    t0 = N.SlotLayout(ModelConfig(window=4, d_model=8, n_heads=2, d_mlp=8, n_layers=1, C=2,
                                  num_steps=4, location_order="random", order_seed=0))
    t1 = N.SlotLayout(ModelConfig(window=4, d_model=8, n_heads=2, d_mlp=8, n_layers=1, C=2,
                                  num_steps=4, location_order="random", order_seed=1))
    assert t0.sched.order != t1.sched.order


def test_qlds_matches_r2_definition():
    g = sch.PLASTIC_NUMBER
    assert abs(g**3 - g - 1) < 1e-12  # the plastic number: g^3 = g + 1
    for w in (8, 16, 24):
        order = sch.qlds_order(w)
        # Point 0 is (0.5, 0.5): the centre cell; point 1 follows the R2 formula.
        assert order[0] == (w // 2) * w + w // 2
        x, y = (0.5 + 1 / g) % 1.0, (0.5 + 1 / g**2) % 1.0
        assert order[1] == int(y * w) * w + int(x * w)


@pytest.mark.parametrize("w", [2, 4, 8, 16, 24])
def test_qlds_first_points_spread_out(w):
    order = sch.qlds_order(w)
    half = w / 2
    quadrants = {(c // w >= half, c % w >= half) for c in order[:4]}
    assert len(quadrants) == 4, [divmod(c, w) for c in order[:4]]


@pytest.mark.parametrize("w,n,min_dist", [(8, 9, 2.0), (16, 9, 4.0), (16, 16, 3.0), (24, 16, 4.0),
                                          (24, 36, 2.0)])
def test_qlds_prefixes_keep_distance(w, n, min_dist):
    """Each prefix is spread over the window: no two of the first n points are close."""
    pts = np.array([divmod(c, w) for c in sch.qlds_order(w)[:n]], dtype=float)
    d = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1))
    d[np.eye(n, dtype=bool)] = np.inf
    assert d.min() >= min_dist
    # The raster order's first points are neighbours.
    raster = np.array([divmod(c, w) for c in sch.raster_order(w)[:n]], dtype=float)
    dr = np.sqrt(((raster[:, None] - raster[None]) ** 2).sum(-1))
    dr[np.eye(n, dtype=bool)] = np.inf
    assert dr.min() < d.min()


def test_schedule_groups_partition_the_window():
    for w, S, sizes_kind, order_kind in [(24, 12, "powerlaw", "qlds"), (8, 12, "cosine", "raster"),
                                         (16, 8, "powerlaw", "random"), (3, 9, "powerlaw", "qlds")]:
        s = sch.schedule(w, S, 2.2, sizes_kind, order_kind, seed=7)
        groups = s.groups
        assert s.num_steps == S == len(groups)
        assert [len(g) for g in groups] == list(s.sizes)
        flat = [p for g in groups for p in g]
        assert flat == list(s.order)
        steps = s.step_of_position()
        for i, g in enumerate(groups):
            assert all(steps[p] == i for p in g)


# ----------------------------------------------------------------------------- M2T slot layout


class _Network:
    """A tiny model's entropy network in float arithmetic, and its slot layout."""

    def __init__(self, window, num_steps, mode="m2t", **kw):
        torch.manual_seed(0)
        self.cfg = ModelConfig(mode=mode, C=4, window=window, d_model=16, n_layers=2, n_heads=2, d_mlp=32,
                               num_steps=num_steps, **kw)
        model = M2TCodec(self.cfg).eval()
        self.layout, self.sched = model.layout, model.layout.sched
        self.ops = N.FloatOps(model.entropy_model, self.cfg, model.layout)

    def m2t_forward(self, tokens):
        return N.m2t_teacher_forced(self.ops, tokens)

    def mt_forward(self, tokens, masked):
        return N.mt_forward(self.ops, tokens, masked)





LAYOUTS = [
    dict(window=24, num_steps=12),  # the paper's schedule: sizes 2, 9, 16, ..., 101
    dict(window=16, num_steps=12),  # the m2t-small preset
    dict(window=8, num_steps=12),
    dict(window=4, num_steps=16),  # groups of size 1 (autoregressive)
    dict(window=6, num_steps=5, group_sizes="cosine", location_order="random", order_seed=3),
    dict(window=5, num_steps=1),
]


@pytest.mark.parametrize("kw", LAYOUTS, ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
def test_m2t_slot_layout_invariants(kw):
    layout = _Network(**kw).layout
    sched = layout.sched
    L, S = sched.window**2, sched.num_steps
    starts = layout.slot_starts
    assert len(starts) == S + 1 and starts[0] == 0 and starts[-1] == layout.num_slots
    slot_group = np.empty(layout.num_slots, dtype=np.int64)
    for i in range(S):
        slot_group[starts[i]:starts[i + 1]] = i
    target = layout.tensor("slot_target_pos", "cpu").numpy()
    inputs = layout.tensor("slot_input_pos", "cpu").numpy()
    step_of = np.asarray(sched.step_of_position())

    # Every position is predicted by exactly one slot, and predicting_slot points at it.
    predicted = target[target >= 0]
    assert sorted(predicted.tolist()) == list(range(L))
    assert np.array_equal(target[layout.tensor("predicting_slot", "cpu").numpy()], np.arange(L))
    # A slot of group i predicts a position of group i, in group order.
    for i, group in enumerate(sched.groups):
        slots = target[starts[i]:starts[i + 1]]
        assert slots[:len(group)].tolist() == list(group)
        assert (slots[len(group):] == -1).all()
    # Slot inputs of group i hold only tokens of earlier groups (exactly group i - 1).
    held = inputs >= 0
    assert (step_of[inputs[held]] < slot_group[held]).all()
    assert (step_of[inputs[held]] == slot_group[held] - 1).all()
    assert not held[starts[0]:starts[1]].any()  # group 0 sees only mask tokens
    # Every token of groups 0..S-2 is fed exactly once (the last group is never an input).
    assert sorted(inputs[held].tolist()) == sorted(p for g in sched.groups[:-1] for p in g)
    # The attention mask is block lower-triangular across slot groups.
    mask = layout.tensor("slot_attn_mask", "cpu").numpy()
    assert mask.shape == (layout.num_slots, layout.num_slots) and mask.dtype == bool
    assert np.array_equal(mask, slot_group[None, :] <= slot_group[:, None])
    for i in range(S):
        a, b = starts[i], starts[i + 1]
        assert mask[a:b, :b].all()  # a group sees itself and all earlier groups
        assert not mask[a:b, b:].any()  # and nothing later


@pytest.mark.parametrize("kw", LAYOUTS[1:4], ids=["w16", "w8", "w4"])
def test_m2t_prediction_of_a_group_ignores_its_own_and_later_tokens(kw):
    """Functional check of the layout: the params of group i do not change when the tokens
    of groups >= i change (no information leaks from the future), in the teacher-forced pass
    and in the cached incremental step."""
    t = _Network(**kw)
    L, C = t.cfg.tokens_per_window, t.cfg.C
    groups = t.sched.groups
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(-5, 6, (2, L, C), generator=gen).float()
    with torch.no_grad():
        base = t.m2t_forward(tokens)
        for i in sorted({0, 1, len(groups) // 2, len(groups) - 1}):
            later = torch.tensor([p for g in groups[i:] for p in g])
            other = tokens.clone()
            other[:, later] = torch.randint(-9, 10, (2, len(later), C), generator=gen).float()
            pert = t.m2t_forward(other)
            idx = torch.tensor(groups[i])
            for a, b in zip((base.means, base.log_scales, base.logits),
                            (pert.means, pert.log_scales, pert.logits)):
                torch.testing.assert_close(a[:, idx], b[:, idx], atol=1e-5, rtol=1e-5)
            # ...while the prediction of some later group does change (the test has teeth).
            if i + 1 < len(groups):
                nxt = torch.tensor([p for g in groups[i + 1:] for p in g])
                assert not torch.allclose(base.means[:, nxt], pert.means[:, nxt])


def test_mt_prediction_ignores_masked_tokens():
    t = _Network(8, 12, mode="mt")
    L, C = 64, t.cfg.C
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(-5, 6, (2, L, C), generator=gen).float()
    masked = torch.rand(2, L, generator=gen) < 0.5
    other = torch.where(masked[..., None], tokens + 7, tokens)
    with torch.no_grad():
        a, b = t.mt_forward(tokens, masked), t.mt_forward(other, masked)
        assert torch.equal(a.means, b.means) and torch.equal(a.log_scales, b.log_scales)
        c = t.mt_forward(other, torch.zeros_like(masked))
        assert not torch.allclose(a.means, c.means)
