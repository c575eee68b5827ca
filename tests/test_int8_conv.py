"""The integer g_s's int8 route (m2t_core/int8_conv.py) gives exactly the integers of its
float32 route, wherever it runs; where the CPU's int8 kernels are not exact it is refused.

Both routes run here on real kernels: the int8 route wherever the probe accepts this CPU
(VNNI or AMX), the float32 route always; test_int_synthesis checks either against the
float64 definition."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from m2t_core import int8_conv, int_synthesis as IS
from m2t_core.registry import load_model
from m2t_core.sysinfo import cpu_flags

REPO = Path(__file__).resolve().parent.parent


def _int8_convs(g_int: IS.IntSynthesis) -> int:
    return sum(1 for c in g_int.convs.values() if c._int8 is not None and c._int8[2] is not None)


def _latents(C: int, shape: tuple[int, int], batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y = torch.round(torch.randn(batch, C, *shape, generator=g) * 5)
    y[0, 0, 0, 0], y[-1, 1, -1, -1] = 32768, -32768  # clamped, defined
    return y


@pytest.mark.parametrize("version", [4, 5])  # integer-v1 (two weight planes), integer-v2 (one, mostly)
@pytest.mark.parametrize("model_name", ["m2t-small-q2", "mt-small-q2"])
@pytest.mark.parametrize("shape,batch", [((3, 5), 1), ((2, 7), 2)])
def test_int8_route_gives_the_float32_routes_pixels(model_name, shape, batch, version):
    g_int = load_model(model_name).int_synthesis(version)
    y = _latents(g_int.conv(g_int.specs[0].name).spec.c_in, shape, batch, seed=sum(shape) + batch)
    float_route = IS.synthesize(g_int, y, int8=False)
    int8_route = IS.synthesize(g_int, y)
    assert torch.equal(int8_route, float_route)
    for b in range(batch):  # alone or in a batch: the same pixels
        assert torch.equal(IS.synthesize(g_int, y[b:b + 1]), float_route[b:b + 1])


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("tile_width,kernels", [(16, "1"), (16, "0"), (int8_conv.TILE_WIDTH, "1")])
def test_bands_tiles_threads_and_image_edges_do_not_change_pixels(monkeypatch, version, tile_width, kernels):
    """Bands of the fewest rows (ROW_STEP, a short last band padded), of a few rows and the
    whole image at once; tiles of 16 columns (the last padded) and the default; the C kernels
    and the torch passes packing and rescaling the tiles; one thread and two: the pixels stay
    the float32 route's."""
    model = load_model("m2t-small-q3")
    g_int = model.int_synthesis(version)
    y = _latents(model.cfg.C, (3, 5), 1, seed=7)  # 80x48 pixels: bands and tiles meet the image edges
    want = IS.synthesize(g_int, y, int8=False)
    monkeypatch.setattr(int8_conv, "TILE_WIDTH", tile_width)
    monkeypatch.setenv("M2T_CPU_KERNELS", kernels)
    threads = torch.get_num_threads()
    try:
        for band_bytes in (1, 40_000, 10 ** 12):
            monkeypatch.setattr(int8_conv, "BAND_BYTES", band_bytes)
            for n in (1, 2):
                torch.set_num_threads(n)
                assert torch.equal(IS.synthesize(g_int, y), want), (band_bytes, n)
    finally:
        torch.set_num_threads(threads)


class _ShapeRecorder:
    """Stands in for a PackedConv in `convolve`: records the input shape of every call and
    returns zero products of the shape oneDNN would. Tiling alone, on any CPU."""

    def __init__(self, rows: int, kernel: int):
        self.rows, self.kernel, self.planes, self.shapes = rows, kernel, 1, set()

    def raw(self, planes: torch.Tensor) -> torch.Tensor:
        self.shapes.add(tuple(planes.shape))
        p = self.kernel // 2
        B2, _, h, w = planes.shape
        return torch.zeros((B2, self.rows, h - 2 * p, w - 2 * p)).contiguous(memory_format=torch.channels_last)


def test_convolution_shapes_do_not_follow_the_image_size():
    """oneDNN compiles a kernel per input shape: images of other sizes whose tiles round to
    the same widths and rows must call it with the shapes it has already compiled, and the
    tile widths stay within TILE_WIDTH in steps of TILE_STEP."""
    seen = []
    for widths in ((10, 20, 40, 80, 160, 300), (9, 18, 36, 72, 150, 290)):  # round to the same tiles
        convs = [_ShapeRecorder(rows=8, kernel=k) for k in (1, 3)]
        for W in widths:
            x = torch.zeros((1, 4, 16, W)).contiguous(memory_format=torch.channels_last)
            for conv in convs:
                out = int8_conv.convolve(conv, x, lambda raw, out, res: out.copy_(raw[:1]))
                assert out.shape == (1, 8, 16, W)
        seen.append([conv.shapes for conv in convs])
    assert seen[1] == seen[0]
    widths = {w - 2 * (k // 2) for k, shapes in zip((1, 3), seen[0]) for *_, w in shapes}
    assert widths == {16, 32, 48, 80, 112}, widths
    assert [int8_conv.tile_width(W) for W in (1, 16, 17, 128, 129, 200, 376, 384, 385)] == \
        [16, 16, 32, 128, 80, 112, 128, 128, 112]


def test_a_cpu_with_int8_dot_products_takes_the_int8_route():
    """Where the CPU has exact int8 dot products (VNNI, AMX) the probe must accept it, so the
    fast route is not lost unnoticed; elsewhere every convolution keeps the float32 route."""
    model = load_model("m2t-small-q2")
    IS.synthesize(model.g_s_int, _latents(model.cfg.C, (2, 2), 1, seed=1))
    flags = cpu_flags()
    capable = bool(flags & {"avx512_vnni", "amx_int8"})
    v2 = model.int_synthesis(5)
    IS.synthesize(v2, _latents(model.cfg.C, (2, 2), 1, seed=1))
    if capable and int8_conv.enabled():
        assert int8_conv.probe(64, 64, 3) and int8_conv.probe(64, 64, 3, 1) and int8_conv.status() == "on"
        assert _int8_convs(model.g_s_int) == len(model.g_s_int.convs) == _int8_convs(v2)
        # integer-v2: one plane of products everywhere but the pixel convolution
        planes = {s.name: v2.conv(s.name)._int8[2].planes for s in v2.specs}
        pixel_conv = [s.name for s in v2.specs if v2.output_of(s.name) == "pixels"]
        assert [n for n, p in planes.items() if p == 2] == pixel_conv
    elif not int8_conv.enabled() or not int8_conv.probe(64, 64, 3):
        assert _int8_convs(model.g_s_int) == 0


def test_kernels_without_vnni_are_refused_and_pixels_stay_exact():
    """oneDNN without VNNI (capped here to AVX2, as on older CPUs) does not sum int8 products
    exactly: the probe must refuse it, and the decoder must give the same pixels anyway."""
    script = (
        "import sys, torch\n"
        "from m2t_core import int8_conv, int_synthesis as IS\n"
        "from m2t_core.registry import load_model\n"
        "m = load_model('m2t-small-q2')\n"
        "g = torch.Generator().manual_seed(3)\n"
        "y = torch.round(torch.randn(1, m.cfg.C, 2, 3, generator=g) * 5)\n"
        "same = used = 0\n"
        "for g in (m.g_s_int, m.int_synthesis(5)):\n"
        "    same += torch.equal(IS.synthesize(g, y), IS.synthesize(g, y, int8=False))\n"
        "    used += sum(1 for c in g.convs.values() if c._int8 is not None and c._int8[2] is not None)\n"
        "print(int8_conv.probe(64, 64, 3), int8_conv.probe(64, 64, 3, 1), used, same, int8_conv.status().split()[0])\n"
    )
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", M2T_INT8_CONV="1")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout.split()
    assert out == ["False", "False", "0", "2", "off"]


PLANE_PACK_CHECK = (
    "import torch\n"
    "from m2t_core import int8_conv\n"
    "x = torch.arange(-32639, 32640, dtype=torch.float32)\n"
    "x = torch.cat([x, x.flip(0), torch.zeros(27)]).view(1, 7, -1, 5).contiguous(memory_format=torch.channels_last)\n"
    "out = torch.empty((2,) + tuple(x.shape[1:]), dtype=torch.uint8, memory_format=torch.channels_last)\n"
    "int8_conv.plane_pack(x, out)\n"
    "v = x.to(torch.int64) + 128\n"
    "hi, lo = torch.div(v, 256, rounding_mode='floor'), torch.remainder(v, 256)\n"
    "print(torch.equal(out[0].long(), hi[0] + 128) and torch.equal(out[1].long(), lo[0]))\n"
)


@pytest.mark.parametrize("kernels", ["1", "0"])  # the fused C kernel (cpu_kernels), the torch passes
@pytest.mark.parametrize("capability", [None, "default", "avx2"])
def test_activation_planes_are_the_bytes_of_every_value(capability, kernels):
    """plane_pack against integer arithmetic over the whole activation range, in its C kernel
    and in its torch passes, with ATen's vector kernels of this CPU and forced down to AVX2
    and to none (the integer conversions the torch passes rely on are chosen per capability)."""
    env = dict(os.environ, M2T_CPU_KERNELS=kernels)
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    out = subprocess.run([sys.executable, "-c", PLANE_PACK_CHECK], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300, check=True).stdout.split()
    assert out[0] == "True", out


def test_weights_within_int8_are_one_plane():
    w = torch.zeros(4, 8, 3, 3, dtype=torch.int32)
    w[0, 0, 0, 0], w[1, 0, 0, 0] = 127, -127
    assert int8_conv.weight_planes(w) == 1 and int8_conv.fits(w, torch.full((4,), 255.0))
    packed = int8_conv.PackedConv(w, torch.zeros(4)) if int8_conv.enabled() else None
    assert packed is None or (packed.planes, packed.rows) == (1, 4)
    w[2, 0, 0, 0] = -128  # -128 is left to two planes (integer-v2 never writes it)
    assert int8_conv.weight_planes(w) == 2
    wide = torch.full((2, 128, 3, 3), 127, dtype=torch.int32)  # 128 * sum|w| over 2^24: not exact in float32
    assert not int8_conv.fits(wide, torch.zeros(2))


def test_weights_beyond_two_int8_planes_or_float32_sums_keep_the_float32_route():
    w = torch.zeros(4, 8, 3, 3, dtype=torch.int32)
    w[0, 0, 0, 0] = 127 * 256 + 127 - 128  # the largest weight whose planes fit int8
    assert int8_conv.fits(w, torch.zeros(4))
    w[0, 0, 0, 0] += 1
    assert not int8_conv.fits(w, torch.zeros(4))
    wide = torch.full((2, 128, 3, 3), 257 * 127, dtype=torch.int32)  # 128 * sum|plane| = 2^24 - ...: too wide
    assert 128 * 127 * wide[0].numel() >= int8_conv.FP32_EXACT
    assert not int8_conv.fits(wide, torch.zeros(2))
    planes = int8_conv.split_weight(torch.tensor([-32896, -129, -128, 0, 127, 128, 32639]).view(7, 1, 1, 1))
    hi, lo = planes[:7].flatten().tolist(), planes[7:].flatten().tolist()
    assert [256 * h + l for h, l in zip(hi, lo)] == [-32896, -129, -128, 0, 127, 128, 32639]
    assert min(hi + lo) >= -128 and max(hi + lo) <= 127


def test_m2t_int8_conv_0_turns_the_route_off(monkeypatch):
    monkeypatch.setenv("M2T_INT8_CONV", "0")
    assert not int8_conv.enabled() and int8_conv.status() == "off (M2T_INT8_CONV=0)"
    model = load_model("m2t-small-q2")
    ops = IS.IntOps(model.g_s_int, torch.device("cpu"))
    assert not ops.int8
    y = _latents(model.cfg.C, (2, 2), 1, seed=2)
    np.testing.assert_array_equal(IS.synthesize(model.g_s_int, y).numpy(),
                                  IS.synthesize(model.g_s_int, y, int8=False).numpy())


def test_a_used_model_still_copies_and_pickles():
    """oneDNN's packed weights (convolutions; linears on AMX) cannot be copied: copies and
    pickles of a model that has coded leave the caches behind and rebuild them, with the same
    streams and pixels."""
    import copy
    import pickle

    from m2t_core import Decoder, Encoder

    model = load_model("m2t-small-q2")
    y = _latents(model.cfg.C, (2, 3), 1, seed=4)
    want = IS.synthesize(model.g_s_int, y)
    rgb = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    stream = Encoder(model).encode_image(rgb).bitstream  # and has encoded: a frozen g_a is cached
    assert model._frozen.get("g_a") is not None or model.transforms_implementation() == "eager"
    pixels = Decoder(model).decompress(stream)  # the entropy model's linears packed too
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(IS.synthesize(other.g_s_int, y), want)
        assert Encoder(other).encode_image(rgb).bitstream == stream
        np.testing.assert_array_equal(Decoder(other).decompress(stream), pixels)


def _rescale_case(planes: int, seed: int):
    """A Rescale of random rows (shifts from -2 to 21: narrow, wide and left-shifting rows;
    all wide for two weight planes, as _combine_products takes them), its plane products
    (2B, planes R, n, W) channels-last within +-2^24, and an output band of a larger tensor."""
    g = torch.Generator().manual_seed(seed)
    B, R, n, W = 2, 24, 3, 7
    shift = torch.randint(8 if planes == 2 else -2, 22, (R,), generator=g)
    bias = torch.randint(-(1 << 30), 1 << 30, (R,), generator=g)
    r = IS.Rescale.of(bias, shift, "cpu")
    raw = torch.randint(-(1 << 24) + 1, 1 << 24, (2 * B, planes * R, n + 2, W + 3), generator=g).float()
    raw = raw.contiguous(memory_format=torch.channels_last)[:, :, :n, :W]  # a tile's block, as convolve passes it
    whole = torch.full((B, R, n + 4, W + 5), -7.0).contiguous(memory_format=torch.channels_last)
    return r, raw, whole


@pytest.mark.parametrize("planes", [1, 2])
@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_rescaling_equals_the_torch_passes(monkeypatch, planes, with_residual):
    """The C kernel (cpu_kernels) that rescales a band's plane products gives, into a band of
    the output, exactly what the torch passes give: the same float32 steps in the same order,
    including rows whose sums leave 2^24 (rounded alike); with a residual block's input added
    and clamped again (IntOps.conv_add), at the activations' extremes too."""
    finish = IS._combine_into if planes == 1 else IS._combine_products
    for seed in range(4):
        r, raw, whole = _rescale_case(planes, seed)
        low, high = (0, IS.ACT_LIMIT) if seed % 2 else (-IS.GATE_HALF, IS.GATE_HALF)
        residual = None
        if with_residual:
            low, high = -IS.ACT_LIMIT, IS.ACT_LIMIT
            g = torch.Generator().manual_seed(100 + seed)
            x = torch.randint(-IS.ACT_LIMIT, IS.ACT_LIMIT + 1, whole.shape, generator=g).float()
            x.view(-1)[::3], x.view(-1)[1::5] = IS.ACT_LIMIT, -IS.ACT_LIMIT
            residual = x.contiguous(memory_format=torch.channels_last)[:, :, 2:5, 1:8]
        fused, torch_passes = whole.clone(), whole.clone()
        block = (slice(None), slice(None), slice(2, 5), slice(1, 8))  # rows 2-4, columns 1-7 of the output
        assert int8_conv.fused_rescale(raw, r, planes, low, high, fused[block], residual)  # the kernel runs here
        monkeypatch.setenv("M2T_CPU_KERNELS", "0")
        finish(raw.clone(), r, low, high, torch_passes[block], residual)
        monkeypatch.delenv("M2T_CPU_KERNELS")
        if with_residual:  # the sum left the clamp's range somewhere, at both ends
            assert (fused == high).any() and (fused == low).any()
        assert torch.equal(fused, torch_passes), seed
        outside = torch.ones(whole.shape, dtype=torch.bool)
        outside[block] = False
        assert torch.equal(fused[outside], whole[outside])


def test_fused_gate_equals_the_torch_passes(monkeypatch):
    """The attention gate's C kernel against IntOps.gate's torch passes, over the whole range
    of the mask logits (the sigmoid table's every entry) and the activations' extremes."""
    g = torch.Generator().manual_seed(11)
    shape = (2, 8, 17, 31)
    m = torch.randint(-IS.GATE_HALF, IS.GATE_HALF + 1, shape, generator=g).float()
    m.view(-1)[: 2 * IS.GATE_HALF + 1] = torch.arange(-IS.GATE_HALF, IS.GATE_HALF + 1).float()
    x, t = (torch.randint(-IS.ACT_LIMIT, IS.ACT_LIMIT + 1, shape, generator=g).float() for _ in range(2))
    t.view(-1)[::7], x.view(-1)[::5] = IS.ACT_LIMIT, -IS.ACT_LIMIT
    x, t, m = (a.contiguous(memory_format=torch.channels_last) for a in (x, t, m))
    ops = IS.IntOps(IS.IntSynthesis(load_model("m2t-small-q2").g_s), "cpu")
    fused = int8_conv.fused_gate(x, t, m, ops.gate_table, IS.GATE_HALF, IS.GATE_BITS, IS.ACT_LIMIT)
    assert fused is not None  # the kernel runs here
    monkeypatch.setenv("M2T_CPU_KERNELS", "0")
    assert torch.equal(fused, ops.gate(x, t.clone(), m, "stream1"))


def test_g_s_kernels_on_torchs_threads_give_the_same_integers_at_any_count():
    """The g_s kernels split their pixels over torch's own OpenMP threads (cpu_kernels.threads)
    as torch.get_num_threads() allows: at 1, 2, 3 and 4 threads (shares of uneven sizes, large
    enough to be split) the plane packing, the rescaling (one and two weight planes, with and
    without a residual) and the gate write the same bytes."""
    from m2t_core import cpu_kernels

    assert cpu_kernels.threads().startswith("torch's OpenMP threads"), cpu_kernels.threads()
    g = torch.Generator().manual_seed(21)
    B, R, n, W = 2, 48, 61, 67  # 4087 pixels of 48 rows an image: shares for 4 threads
    x = torch.randint(-IS.ACT_LIMIT, IS.ACT_LIMIT + 1, (B, R, n, W), generator=g).float()
    x = x.contiguous(memory_format=torch.channels_last)
    t, m = (torch.randint(-IS.ACT_LIMIT, IS.ACT_LIMIT + 1, x.shape, generator=g).float()
            .clamp_(-IS.GATE_HALF, IS.GATE_HALF).contiguous(memory_format=torch.channels_last) for _ in range(2))
    ops = IS.IntOps(IS.IntSynthesis(load_model("m2t-small-q2").g_s), "cpu")
    cases = {}
    for planes in (1, 2):
        shift = torch.randint(8 if planes == 2 else -2, 22, (R,), generator=g)
        r = IS.Rescale.of(torch.randint(-(1 << 30), 1 << 30, (R,), generator=g), shift, "cpu")
        raw = torch.randint(-(1 << 24) + 1, 1 << 24, (2 * B, planes * R, n, W), generator=g).float()
        cases[planes] = (r, raw.contiguous(memory_format=torch.channels_last))

    def run() -> list[torch.Tensor]:
        packed = torch.empty((2 * B, R, n, W), dtype=torch.uint8, memory_format=torch.channels_last)
        int8_conv.plane_pack(x, packed)
        outs = [packed]
        for planes, (r, raw) in cases.items():
            for residual in (None, x):
                out = torch.empty_like(x)
                assert int8_conv.fused_rescale(raw, r, planes, -IS.ACT_LIMIT, IS.ACT_LIMIT, out, residual)
                outs.append(out)
        outs.append(int8_conv.fused_gate(x, t, m, ops.gate_table, IS.GATE_HALF, IS.GATE_BITS, IS.ACT_LIMIT))
        return outs

    threads = torch.get_num_threads()
    try:
        results = {}
        for count in (1, 2, 3, 4):
            torch.set_num_threads(count)
            results[count] = run()
    finally:
        torch.set_num_threads(threads)
    for count in (2, 3, 4):
        for k, (a, b) in enumerate(zip(results[1], results[count])):
            assert torch.equal(a, b), (count, k)
