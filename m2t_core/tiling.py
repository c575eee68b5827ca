"""Run g_a and g_s in overlapping tiles, so a transform's memory no longer grows with the image.

Untiled, the transforms' activations dominate the codec's memory: about 190 MiB per megapixel
for the small preset (N=64 channels at 1/2 resolution in float32, and their temporaries), so a
64 MP image would need ~12 GB. Tiled, the peak is that of one tile.

How. Tiles are laid out on the latent grid (one latent = 16x16 pixels), so every tile edge is
on a 16-pixel boundary and the strided convolutions see the same phase as in the untiled run.
Each tile has a *core* of `tile` x `tile` latents and is run with `margin` extra latents on
every side (clipped at the image's edges, where the untiled run pads the same way); only the
core of the output is kept. `margin` covers the transform's receptive-field radius (computed
from the module tree: `receptive_radius`), so every kept output value is computed from
exactly the inputs the untiled run uses; results differ only in float rounding (other tensor
shapes pick other convolution kernels), i.e. in the last bits. The default tile core is 8
margins wide, so the margins cost at most (1 + 2/8)^2 = 1.56x the transform work (less at
the image edges), and images that fit in one tile (core + margins) are not tiled at all:
their output is exactly what the untiled transform gives.

Determinism: the tiling depends only on the latent size (known to the decoder from the
header) and the module, so the encoder's `reconstruct` and the decoder run the same tiles and
produce the same bits. The coded latent is simply what the tiled g_a produced.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import bitstream as bs
from .transforms import SimplifiedAttention

SCALE = bs.DOWNSAMPLING  # pixels per latent, per side
TILE_MARGINS = 8  # default tile core, in margins: overlap overhead <= (1 + 2/8)^2
MIN_TILE = 16  # latents (256 pixels): smaller cores would spend most of the work in margins


@dataclass(frozen=True)
class TilePlan:
    """Tiles on the latent grid: `tile` x `tile` latents kept per tile, `margin` latents of
    context on each side. Inputs of at most `max_untiled` latents are run whole."""

    tile: int
    margin: int

    @property
    def max_untiled(self) -> int:
        return (self.tile + 2 * self.margin) ** 2

    def __post_init__(self) -> None:
        if self.tile < 1 or self.margin < 0:
            raise ValueError(f"tile must be >= 1 and margin >= 0 latents, got tile={self.tile}, margin={self.margin}")


# ---------------------------------------------------------------------- receptive field


def receptive_radius(module: nn.Module) -> float | None:
    """How far (in the module's *input* pixels) an output value can see from its own position:
    an upper bound computed from the module tree, or None when it cannot be bounded (a layer
    of unknown kind with parameters, e.g. global attention).

    Convolutions and transposed convolutions are exact; parameter-free leaves (activations)
    add nothing; any other module is treated as its children run one after the other, which
    is exact for nn.Sequential and residual blocks and an upper bound for parallel branches;
    the simplified attention blocks' two branches (trunk, mask) count as parallel (the max)."""
    radius, _ = _walk(module, 0.0, 1.0)
    return radius


def _walk(module: nn.Module, radius: float | None, jump: float) -> tuple[float | None, float]:
    """(radius, jump) after `module`; jump = input pixels per pixel at the current resolution."""
    if radius is None:
        return None, jump
    if isinstance(module, nn.ConvTranspose2d):
        k, s, p, d = module.kernel_size[0], module.stride[0], module.padding[0], module.dilation[0]
        if module.kernel_size[0] != module.kernel_size[1] or module.stride[0] != module.stride[1]:
            return None, jump
        # Output s*m + r reads inputs m + j with 0 <= r + p - d*s*j... (d=1): |j| <= ceil(max(p, k-1-p) / s).
        reach = math.ceil(max(p, d * (k - 1) - p) / s)
        return radius + reach * jump, jump / s
    if isinstance(module, nn.Conv2d):
        k, s, d = module.kernel_size, module.stride, module.dilation
        if k[0] != k[1] or s[0] != s[1] or d[0] != d[1]:
            return None, jump
        pad = module.padding
        half = d[0] * (k[0] - 1) / 2 if isinstance(pad, str) else max(pad[0], d[0] * (k[0] - 1) - pad[0])
        return radius + half * jump, jump * s[0]
    if isinstance(module, SimplifiedAttention):  # x + trunk(x) * sigmoid(mask(x)): parallel branches
        branches = [_walk(branch, radius, jump) for branch in (module.trunk, module.mask)]
        if any(r is None or j != jump for r, j in branches):
            return None, jump
        return max(r for r, _ in branches), jump
    children = list(module.children())
    if not children:
        if any(True for _ in module.parameters(recurse=False)):
            return None, jump  # a layer we cannot reason about
        return radius, jump  # activations, pixel shuffles of known transposed convs, ...
    for child in children:
        radius, jump = _walk(child, radius, jump)
        if radius is None:
            return None, jump
    return radius, jump


def plan_for(module: nn.Module, latents_per_input: float) -> TilePlan | None:
    """The default plan for a transform: margin = its receptive-field radius in latents
    (+1 for the alignment of strided outputs), core = TILE_MARGINS margins (>= MIN_TILE).
    `latents_per_input`: 1/16 for g_a (pixels in), 1 for g_s (latents in). None: no tiling."""
    radius = receptive_radius(module)
    if radius is None:
        return None
    margin = math.ceil(radius * latents_per_input) + 1
    return TilePlan(tile=max(MIN_TILE, TILE_MARGINS * margin), margin=margin)


_PLANS: "weakref.WeakKeyDictionary[nn.Module, TilePlan | None]" = weakref.WeakKeyDictionary()
_FORCED: list[TilePlan] = []


def _default_plan(module: nn.Module, kind: str) -> TilePlan | None:
    if _FORCED:
        return _FORCED[-1]
    if module not in _PLANS:
        _PLANS[module] = plan_for(module, 1.0 / SCALE if kind == "analysis" else 1.0)
    return _PLANS[module]


@contextlib.contextmanager
def forced_plan(plan: TilePlan):
    """Use `plan` for every transform run inside the block (tests and measurements: e.g. a
    small tile forces tiling on a Kodak-size image). Not thread-safe; encoder and decoder must
    use the same plan, or the decoder's output differs from what the encoder measured."""
    _FORCED.append(plan)
    try:
        yield plan
    finally:
        _FORCED.pop()


# ---------------------------------------------------------------------- tiles


def tiles(h: int, w: int, plan: TilePlan) -> Iterator[tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]]]:
    """Tiles of an h x w latent grid: ((core y0, y1), (core x0, x1), (crop y0, y1), (crop x0, x1))."""
    for y0 in range(0, h, plan.tile):
        y1 = min(h, y0 + plan.tile)
        for x0 in range(0, w, plan.tile):
            x1 = min(w, x0 + plan.tile)
            yield ((y0, y1), (x0, x1), (max(0, y0 - plan.margin), min(h, y1 + plan.margin)),
                   (max(0, x0 - plan.margin), min(w, x1 + plan.margin)))


def synthesis_tiles(g_s: nn.Module, h: int, w: int) -> list[tuple]:
    """The tiles `synthesis` runs an h x w latent in (default plan, or a forced one), as
    `tiles` gives them: one tile of the whole latent where it runs untiled."""
    plan = _resolve(g_s, "synthesis", None, h, w)
    return [((0, h), (0, w), (0, h), (0, w))] if plan is None else list(tiles(h, w, plan))


def _resolve(module: nn.Module, kind: str, plan: TilePlan | None, h: int, w: int) -> TilePlan | None:
    plan = _default_plan(module, kind) if plan is None else plan
    if plan is None or h * w <= plan.max_untiled:
        return None
    return plan


def _to_unit_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0


def analysis(g_a: nn.Module, x: torch.Tensor, plan: TilePlan | None = None, run=None) -> torch.Tensor:
    """g_a of an RGB image: x (1, 3, H, W) uint8 -> y (C, ceil(H/16), ceil(W/16)) float.

    The image is edge-padded to a multiple of 16 (as the bitstream specifies). Images that fit
    in one tile of `plan` (default: from g_a's receptive field) run whole, exactly as before.
    `run` computes g_a (default: the module itself; e.g. its frozen CPU form)."""
    run = g_a if run is None else run
    H, W = x.shape[-2:]
    pad_b, pad_r = bs.image_padding(H, W)
    h, w = (H + pad_b) // SCALE, (W + pad_r) // SCALE
    plan = _resolve(g_a, "analysis", plan, h, w)
    if plan is None:
        return run(F.pad(_to_unit_float(x), (0, pad_r, 0, pad_b), mode="replicate"))[0]
    y = None
    for (cy0, cy1), (cx0, cx1), (ty0, ty1), (tx0, tx1) in tiles(h, w, plan):
        # The crop in pixels; beyond the image's bottom/right edge, the same edge padding.
        py0, py1, px0, px1 = ty0 * SCALE, ty1 * SCALE, tx0 * SCALE, tx1 * SCALE
        crop = _to_unit_float(x[:, :, py0:min(py1, H), px0:min(px1, W)])
        crop = F.pad(crop, (0, px1 - min(px1, W), 0, py1 - min(py1, H)), mode="replicate").contiguous()
        out = run(crop)[0]  # (C, ty1 - ty0, tx1 - tx0)
        if y is None:
            y = out.new_empty(out.shape[0], h, w)
        y[:, cy0:cy1, cx0:cx1] = out[:, cy0 - ty0:cy1 - ty0, cx0 - tx0:cx1 - tx0]
    return y


def _to_uint8(x_hat: torch.Tensor) -> torch.Tensor:
    if x_hat.dtype == torch.uint8:  # already pixels (the integer g_s)
        return x_hat
    return torch.round(x_hat.clamp(0.0, 1.0) * 255.0).to(torch.uint8)


def synthesis(g_s: nn.Module, y: torch.Tensor, height: int, width: int,
              plan: TilePlan | None = None, run=None) -> torch.Tensor:
    """g_s of a latent, rounded to pixels: y (1, C, h, w) float -> (3, height, width) uint8.

    Latents that fit in one tile of `plan` (default: from g_s's receptive field) run whole,
    exactly as before; otherwise each tile's pixels are rounded and written into the output,
    so no full-size float image exists. `run` computes g_s (default: the module itself)."""
    run = g_s if run is None else run
    h, w = y.shape[-2:]
    plan = _resolve(g_s, "synthesis", plan, h, w)
    if plan is None:
        return _to_uint8(run(y)[0, :, :height, :width])
    out = torch.empty(3, height, width, dtype=torch.uint8, device=y.device)
    for (cy0, cy1), (cx0, cx1), (ty0, ty1), (tx0, tx1) in tiles(h, w, plan):
        x_hat = run(y[:, :, ty0:ty1, tx0:tx1].contiguous())[0]  # (3, 16 (ty1 - ty0), 16 (tx1 - tx0))
        oy0, ox0 = cy0 * SCALE, cx0 * SCALE
        oy1, ox1 = min(height, cy1 * SCALE), min(width, cx1 * SCALE)
        if oy1 <= oy0 or ox1 <= ox0:
            continue
        out[:, oy0:oy1, ox0:ox1] = _to_uint8(x_hat[:, oy0 - ty0 * SCALE:oy1 - ty0 * SCALE,
                                                   ox0 - tx0 * SCALE:ox1 - tx0 * SCALE])
    return out


def analysis_batch(g_a: nn.Module, x: torch.Tensor, run=None) -> torch.Tensor | None:
    """g_a of B images of one size in one call: x (B, 3, H, W) uint8 -> y (B, C, h, w), or None
    when images of this size run in tiles (then each goes through `analysis`). The batch may
    change the float rounding of a few values (other kernels), never which inputs are used."""
    run = g_a if run is None else run
    H, W = x.shape[-2:]
    pad_b, pad_r = bs.image_padding(H, W)
    if _resolve(g_a, "analysis", None, (H + pad_b) // SCALE, (W + pad_r) // SCALE) is not None:
        return None
    return run(F.pad(_to_unit_float(x), (0, pad_r, 0, pad_b), mode="replicate"))


def synthesis_batch(g_s: nn.Module, y: torch.Tensor, height: int, width: int, run=None) -> torch.Tensor | None:
    """g_s of B latents of one size: y (B, C, h, w) float -> (B, 3, height, width) uint8, or None
    when latents of this size run in tiles (then each goes through `synthesis`)."""
    run = g_s if run is None else run
    if _resolve(g_s, "synthesis", None, *y.shape[-2:]) is not None:
        return None
    return _to_uint8(run(y)[:, :, :height, :width])
