"""The integer synthesis transform (m2t_core/int_synthesis.py) computes exactly its integer
definition: checked against a float64 reference that computes the same integers the direct
way (whole accumulators, one floor division per output), where float64 is exact for every
value involved. The float32 form splits activations into planes and rescales in steps; any
slip in those bounds or steps shows here as a differing pixel."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from m2t_core import int_synthesis as IS
from m2t_core import load_model

from _models import tiny_model


class ReferenceOps:
    """The integer definition in float64: conv of the whole activation (|sums| < 2^53), then
    floor((acc + bias + 2^(s-1)) / 2^s) per row (a left shift where s < 0), clamped."""

    def __init__(self, model: IS.IntSynthesis):
        self.m = model
        self.deconvs = sum(1 for s in model.specs if s.upsample > 1)
        self.stage = 0
        self.table = torch.from_numpy(IS.sigmoid_table()).double()

    def enter(self, y):
        self.stage = 0
        e = self.m.exp("stream0")
        y = y.double().clamp(-IS.ACT_LIMIT, IS.ACT_LIMIT)
        if e >= 0:
            return (y * 2.0 ** e).clamp(-IS.ACT_LIMIT, IS.ACT_LIMIT)
        return torch.floor((y + 2.0 ** (-e - 1)) / 2.0 ** -e).clamp(-IS.ACT_LIMIT, IS.ACT_LIMIT)

    def _conv(self, name, x, low, high):
        conv = self.m.conv(name)
        shift = (self.m.exp(self.m.input_of(name)) + conv.w_exp - self.m.exp(self.m.output_of(name))).double()
        acc = F.conv2d(x, conv.weight.double(), padding=conv.spec.kernel // 2) + conv.bias.double()[:, None, None]
        half = torch.where(shift > 0, 2.0 ** (shift - 1), 0.0)[:, None, None]
        out = torch.floor((acc + half) * 2.0 ** -shift[:, None, None])  # exact: integers < 2^53, powers of two
        return out.clamp(low, high)

    def conv(self, name, x, a_in, a_out, relu):
        if a_out == "gate":
            return self._conv(name, x, -IS.GATE_HALF, IS.GATE_HALF)
        return self._conv(name, x, 0 if relu else -IS.ACT_LIMIT, IS.ACT_LIMIT)

    def deconv(self, name, x, stream):
        self.stage += 1
        out = "pixels" if self.stage == self.deconvs else f"stream{self.stage}"
        return F.pixel_shuffle(self._conv(name, x, -IS.ACT_LIMIT, IS.ACT_LIMIT), self.m.conv(name).spec.upsample), out

    def conv_add(self, name, h, x, a_in, stream):
        return (x + self.conv(name, h, a_in, stream, relu=False)).clamp(-IS.ACT_LIMIT, IS.ACT_LIMIT)

    def gate(self, x, t, m, stream):
        sig = self.table[(m + IS.GATE_HALF).long()]
        return (x + torch.floor((t * sig + 2.0 ** (IS.GATE_BITS - 1)) / 2.0 ** IS.GATE_BITS)).clamp(
            -IS.ACT_LIMIT, IS.ACT_LIMIT)


def reference_pixels(model: IS.IntSynthesis, y: torch.Tensor) -> np.ndarray:
    q = IS.forward(ReferenceOps(model), model.program, y)
    px = torch.floor((q * 255.0 + 2.0 ** (IS.PIXEL_EXP - 1)) / 2.0 ** IS.PIXEL_EXP).clamp(0, 255)
    return px.to(torch.uint8).numpy()


def _latents(C: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y = torch.round(torch.randn(2, C, 3, 4, generator=g) * 6)
    y[0, 0, 0, 0], y[0, 1, 0, 1], y[1, 2, 1, 0] = 32768, -32768, 900  # extremes clamp, defined
    return y


@pytest.mark.parametrize("version", [4, 5])
def test_shipped_model_equals_its_integer_definition(version):
    g_int = load_model("m2t-small-q2").int_synthesis(version)
    assert g_int.exactness_margin_bits() > 0
    narrow = sum(int((g_int.shift(s.name) < 8).sum()) for s in g_int.specs)  # rows rescaled in one step
    assert (narrow > 0) == (version == 5)
    y = _latents(g_int.specs[0].c_in, 0)
    np.testing.assert_array_equal(IS.synthesize(g_int, y).numpy(), reference_pixels(g_int, y))


def test_integer_v2_weights_are_the_finest_within_int8():
    """integer-v2 (format 5): every convolution but the pixel one has weight rows within
    +-127 at the finest exponent that keeps them there and within the float32 budget (one
    step finer breaks a bound, unless the shift cap stops it); the pixel convolution keeps
    integer-v1's integers; the activation exponents are shared. Derived again, the same."""
    model = load_model("m2t-small-q3")
    v1, v2 = model.g_s_int, model.int_synthesis(5)
    assert torch.equal(v1.act_exp, v2.act_exp) and v2.exactness_margin_bits() > 0
    rows = dict((spec.name, (w, b)) for spec, w, b in v1._float_rows(model.g_s))
    for spec in v2.specs:
        mine, theirs = v1.conv(spec.name), v2.conv(spec.name)
        if v2.output_of(spec.name) == "pixels":
            assert all(torch.equal(getattr(mine, k), getattr(theirs, k)) for k in ("weight", "bias", "w_exp"))
            continue
        assert int(theirs.weight.abs().max()) <= IS.WEIGHT8_MAX
        w = rows[spec.name][0]
        finer = torch.round(w * torch.pow(2.0, theirs.w_exp.double() + 1)[:, None]).abs()
        broken = (finer.amax(dim=1) > IS.WEIGHT8_MAX) | (finer.sum(dim=1) * IS.PLANE_MAX > IS.ROW_BUDGET)
        capped = v2.shift(spec.name) >= IS.MAX_SHIFT
        assert bool((broken | capped).all()), spec.name
    again = v1.eight_bit(model.g_s)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), v2.state_dict().values()))
    # 8-bit weights cost little: within 0.1 dB of integer-v1's pixels on a smooth latent
    y = _latents(model.cfg.C, 5)[:1].clamp(-20, 20)
    diff = IS.synthesize(v1, y).double() - IS.synthesize(v2, y).double()
    assert 10 * np.log10(255 ** 2 / float((diff ** 2).mean())) > 35


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("bump", [0, 6, 12])
def test_every_rescaling_form_equals_the_definition(bump, version):
    """Weights 2^bump times larger get 2^bump coarser integer weights, so rows shift by less
    than 8, or by a negative amount (a left shift): those forms must hold exactly too."""
    model = copy.deepcopy(tiny_model("m2t")).eval()
    g_int = model.g_s_int
    with torch.no_grad():
        for p in model.g_s.parameters():
            p.mul_(2.0 ** bump)
        g_int.export_from(model.g_s)
    shifts = torch.cat([g_int.exp(g_int.input_of(s.name)) + g_int.conv(s.name).w_exp - g_int.exp(g_int.output_of(s.name))
                        for s in g_int.specs])
    assert g_int.exactness_margin_bits() > 0
    if bump == 12:
        assert int(shifts.min()) < 0 < int(shifts.max())  # left shifts, narrow and wide rows
    if version == 5:  # integer-v2: 8-bit weights
        g_int = g_int.eight_bit(model.g_s)
        assert g_int.exactness_margin_bits() > 0
    y = _latents(model.cfg.C, bump)
    np.testing.assert_array_equal(IS.synthesize(g_int, y).numpy(), reference_pixels(g_int, y))


def test_sigmoid_table_is_pinned_and_monotone():
    table = IS.sigmoid_table()
    assert table[0] == 0 and table[IS.GATE_HALF] == 1 << (IS.GATE_BITS - 1) and table[-1] == 1 << IS.GATE_BITS
    assert (np.diff(table) >= 0).all()
    assert (table + table[::-1] == 1 << IS.GATE_BITS).all()  # sigmoid(-x) = 1 - sigmoid(x), exactly


def test_checkpoints_leave_out_the_integer_weights_the_float_g_s_gives_back(tmp_path):
    """Version 5: a checkpoint stores the integer g_s's weights only when the float g_s, as
    written, does not reproduce them; either way loading gives the same integers and hash."""
    from safetensors import safe_open

    from m2t_core import registry

    model = copy.deepcopy(tiny_model("m2t")).eval()
    with torch.no_grad():  # transforms that fp16 holds exactly, integers derived from them
        for p in [*model.g_a.parameters(), *model.g_s.parameters()]:
            p.copy_(p.half().float())
        model.g_s_int.export_from(model.g_s)
    model.mark_exact_synced()
    weight_keys = {f"g_s_int.convs.{k}.weight" for k in model.g_s_int.convs}

    def saved(name):
        path = registry.save_checkpoint(model, tmp_path / f"{name}.safetensors", "tiny", dtype=torch.float16,
                                        float_entropy_model=False)
        with safe_open(str(path), framework="pt") as f:
            keys, version = set(f.keys()), f.metadata()["format_version"]
        return registry.load_checkpoint(path), keys, version

    slim, keys, version = saved("slim")
    assert version == "5" and not keys & weight_keys and any(k.startswith("g_s_int.") for k in keys)
    assert slim.weights_hash() == model.weights_hash() and slim.weights_hash(4) == model.weights_hash(4)
    for k in weight_keys:
        assert torch.equal(slim.state_dict()[k], model.state_dict()[k]), k
    # Integers the floats do not give back (here one weight nudged) are stored and kept.
    first = next(iter(model.g_s_int.convs.values()))
    first.weight.view(-1)[0] += 1
    full, keys, _ = saved("full")
    assert weight_keys <= keys
    assert torch.equal(next(iter(full.g_s_int.convs.values())).weight, first.weight)
    assert full.weights_hash(4) == model.weights_hash(4) != slim.weights_hash(4)
    # Format 5 decodes with integer-v2, derived from the float g_s (the nudged integer is not in it).
    assert full.weights_hash(5) == model.weights_hash(5) == slim.weights_hash(5)


def test_integer_v2_keeps_its_prepared_convolutions_between_decodes():
    """The integer-v2 g_s is derived inside synthesis (under inference mode); its buffers must
    still carry version counters, so each convolution's prepared weights and rescaling terms
    (oneDNN's packed planes, Rescale) are made once, not again for every image; and they are
    made again when the float g_s changes."""
    model = copy.deepcopy(load_model("m2t-small-q3"))
    y = torch.round(torch.randn(model.cfg.C, 2, 3, generator=torch.Generator().manual_seed(4)) * 4)
    first = model.synthesis(y, 32, 48, 5)
    v2 = model.int_synthesis(5)
    name = v2.specs[0].name
    assert not v2.conv(name).weight.is_inference()
    prepared = v2.conv(name)._carriers[torch.device("cpu")][1]
    assert np.array_equal(model.synthesis(y, 32, 48, 5), first)
    assert model.int_synthesis(5) is v2 and v2.conv(name)._carriers[torch.device("cpu")][1] is prepared
    with torch.no_grad():
        model.g_s.layers[0].trunk[0].body[0].weight.mul_(0.5)
    assert model.int_synthesis(5) is not v2
