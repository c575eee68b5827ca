"""Per-image rate control: the cheapest setting that reaches a target PSNR, or the best one
whose stream fits a target bpp, over either

* the quality of one variable-rate model (`encode_at_quality`: Q in [1, K] on a grid of
  QUALITY_STEP; g_a runs once, each trial only scales, rounds and codes; the stream's header
  holds the chosen Q), or
* a ladder of fixed-rate models (`encode_to_target`: m2t-small-q1..q4 by default, ordered by
  their training lambda; each stream names its model).

The search is a bisection for the first setting that meets the target (a PSNR target needs
each tried stream's reconstruction, which is the decoder's exact output; a bpp target needs
only the stream's length). It assumes that rate and PSNR grow with the setting for every
image. They usually do; where they do not, the chosen setting still meets the target (each
choice is measured), but a cheaper one may have met it too. A target out of reach gets the
closest setting (the top one for PSNR, the bottom one for bpp) with `met=False`: reported,
never hidden.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import numpy as np

    from .encoder import EncodedImage
    from .model import M2TCodec

DEFAULT_LADDER = ("m2t-small-q1", "m2t-small-q2", "m2t-small-q3", "m2t-small-q4")
QUALITY_STEP = 1 / 16  # the variable-rate search's grid: at most ~log2(16 (K - 1)) + 1 trials
MAX_PSNR = 100.0  # dB: beyond it a target is a typo, not a quality


@dataclass(frozen=True)
class Target:
    """Exactly one of: `bpp` (the stream's bits per pixel at most this), `psnr` (dB, at least)."""

    bpp: float | None = None
    psnr: float | None = None

    def __post_init__(self) -> None:
        if (self.bpp is None) == (self.psnr is None):
            raise ValueError("give exactly one target: bpp or psnr")
        value = self.bpp if self.bpp is not None else self.psnr
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"a target must be a positive number, got {value!r}")
        if self.psnr is not None and self.psnr > MAX_PSNR:
            raise ValueError(f"target PSNR {self.psnr} dB is beyond {MAX_PSNR:.0f} dB")

    def describe(self) -> str:
        return f"<= {self.bpp:g} bpp" if self.bpp is not None else f">= {self.psnr:g} dB PSNR"


@dataclass
class Trial:
    model_id: str
    bpp: float
    psnr: float | None  # None for a bpp target (no reconstruction needed)
    quality: float | None = None  # a variable-rate model's quality


@dataclass
class TargetedImage:
    """The chosen stream, its model, whether it meets the target, and every encode tried."""

    encoded: EncodedImage
    model_id: str
    target: Target
    met: bool
    psnr: float | None
    trials: list[Trial] = field(default_factory=list)
    quality: float | None = None  # the chosen quality of a variable-rate model


def load_ladder(names: Sequence[str] | None = None, device: str = "cpu") -> list[M2TCodec]:
    """The ladder's models (registry names or checkpoint paths; default DEFAULT_LADDER),
    ordered from the lowest rate up by their training lambda (checkpoint metadata). Raises
    ValueError when a model has no lambda, two share one, or the ladder is empty."""
    from .registry import checkpoint_path, load_model, read_metadata

    names = list(names or DEFAULT_LADDER)
    if not names:
        raise ValueError("the ladder needs at least one model")
    keyed = []
    for name in names:
        _, _, info = read_metadata(checkpoint_path(name))
        lmbda = info.get("lambda") if isinstance(info, dict) else None
        if not isinstance(lmbda, (int, float)) or not lmbda > 0:
            raise ValueError(f"ladder model {name}: its checkpoint records no training lambda to order it by")
        keyed.append((float(lmbda), name))
    lambdas = [k for k, _ in keyed]
    if len(set(lambdas)) != len(lambdas):
        raise ValueError(f"ladder models share a training lambda: {sorted(keyed)}")
    return [load_model(name, device=device) for _, name in sorted(keyed)]


def encode_to_target(rgb: np.ndarray, target: Target, ladder: Sequence[M2TCodec],
                     max_pixels: int | None = None, format_version: int | None = None,
                     refine_steps: int = 0) -> TargetedImage:
    """RGB uint8 (H, W, 3) -> the stream of the ladder model chosen for `target` (see the
    module docstring). `ladder` is ordered from the lowest rate up (load_ladder);
    `format_version` and `refine_steps` (each model tried is refined) as Encoder's."""
    from .encoder import Encoder
    from .metrics import psnr

    if not ladder:
        raise ValueError("the ladder needs at least one model")
    options: dict = {"refine_steps": refine_steps}
    if max_pixels is not None:
        options["max_pixels"] = max_pixels
    if format_version is not None:  # the PSNR judged is that format's decoder output
        options["format_version"] = format_version
    by_psnr = target.psnr is not None

    def trial(i: int) -> tuple[EncodedImage, Trial]:
        encoded = Encoder(ladder[i], reconstruct=by_psnr, **options).encode_image(rgb)
        quality = psnr(rgb, encoded.x_hat) if by_psnr else None
        return encoded, Trial(ladder[i].model_id, encoded.bpp, quality)

    return _search(len(ladder), trial, target)


def encode_at_quality(rgb: np.ndarray, target: Target, model: M2TCodec, max_pixels: int | None = None,
                      step: float = QUALITY_STEP, refine_steps: int = 0) -> TargetedImage:
    """RGB uint8 (H, W, 3) -> the stream of a variable-rate `model` at the quality chosen for
    `target`, searched on a grid of `step` over [1, K] (see the module docstring); with
    `refine_steps`, each quality tried codes its own refined latent (refine.py)."""
    from . import bitstream as bs
    from . import refine
    from .encoder import Encoder
    from .metrics import psnr
    from .rate import QUALITY_ONE

    if not model.rate_levels:
        raise ValueError(f"model {model.model_id!r} has one rate: search a ladder of models instead")
    if not 0 < step <= model.rate_levels - 1:
        raise ValueError(f"the quality step must be in (0, {model.rate_levels - 1}], got {step!r}")
    options = {} if max_pixels is None else {"max_pixels": max_pixels}
    # refine_steps here refuses, before g_a runs, a model that refinement cannot serve.
    encoder = Encoder(model, refine_steps=refine_steps, **options)
    H, W = rgb.shape[:2]
    bs.check_image_size(H, W, encoder.max_pixels)
    y = model.latent(rgb)  # g_a once
    first, last = QUALITY_ONE, model.rate_levels * QUALITY_ONE
    stride = max(1, round(step * QUALITY_ONE))
    codes = list(range(first, last, stride)) + [last]

    def trial(i: int) -> tuple[EncodedImage, Trial]:
        if refine_steps:  # each quality its own refinement
            y_hat = refine.refined_y_hat(model, rgb, y, refine_steps, codes[i])
        else:
            y_hat = model.quantize(y, codes[i])
        encoded = encoder.encode_latent(y_hat, H, W, codes[i])
        quality = None
        if target.psnr is not None:
            encoded.x_hat = model.synthesis(y_hat, H, W, encoder.format_version, codes[i])
            quality = psnr(rgb, encoded.x_hat)
        return encoded, Trial(model.model_id, encoded.bpp, quality, codes[i] / QUALITY_ONE)

    return _search(len(codes), trial, target)


def _search(count: int, trial, target: Target) -> TargetedImage:
    """Bisection over settings 0..count-1 ordered by rate; `trial(i)` -> (EncodedImage, Trial)."""
    by_psnr = target.psnr is not None
    done: dict[int, tuple[EncodedImage, Trial]] = {}

    def tried(i: int) -> tuple[EncodedImage, Trial]:
        if i not in done:
            done[i] = trial(i)
        return done[i]

    def meets(i: int) -> bool:
        t = tried(i)[1]
        return t.psnr >= target.psnr if by_psnr else t.bpp <= target.bpp

    # PSNR: the first setting that meets the target (the cheapest). bpp: the last one that does
    # (the best within the budget); search for the first one that does not, instead.
    lo, hi = 0, count  # the answer is in [lo, hi]
    while lo < hi:
        mid = (lo + hi) // 2
        if meets(mid) == by_psnr:
            hi = mid
        else:
            lo = mid + 1
    chosen = (min(lo, count - 1) if by_psnr else max(lo - 1, 0))
    encoded, chosen_trial = tried(chosen)
    return TargetedImage(encoded, chosen_trial.model_id, target, meets(chosen), chosen_trial.psnr,
                         [done[i][1] for i in sorted(done)], chosen_trial.quality)
