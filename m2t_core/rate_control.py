"""Per-image rate control over a ladder of fixed-rate models: the cheapest model that reaches
a target PSNR, or the best one whose stream fits a target bpp.

Until one variable-rate model covers the range (issue 23), the quality settings are the
shipped models themselves (m2t-small-q1..q4), ordered by their training lambda. A target is
met per image by an encoder-side search over that ladder: bisection for the first model
that meets it (a PSNR target needs each tried stream's reconstruction, which is the
decoder's exact output; a bpp target needs only the stream's length). Each stream names its
model in its header, so any decoder decodes the result as usual.

Bisection assumes that rate and PSNR grow along the ladder for every image. They usually
do; where they do not, the chosen model still meets the target (each choice is measured),
but a cheaper one may have met it too. A target out of the ladder's reach gets the closest
model (the top one for PSNR, the bottom one for bpp) with `met=False`: reported, never hidden.
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


@dataclass
class TargetedImage:
    """The chosen stream, its model, whether it meets the target, and every encode tried."""

    encoded: EncodedImage
    model_id: str
    target: Target
    met: bool
    psnr: float | None
    trials: list[Trial] = field(default_factory=list)


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
                     max_pixels: int | None = None, format_version: int | None = None) -> TargetedImage:
    """RGB uint8 (H, W, 3) -> the stream of the ladder model chosen for `target` (see the
    module docstring). `ladder` is ordered from the lowest rate up (load_ladder);
    `format_version` as Encoder's."""
    from .encoder import Encoder
    from .metrics import psnr

    if not ladder:
        raise ValueError("the ladder needs at least one model")
    options = {} if max_pixels is None else {"max_pixels": max_pixels}
    if format_version is not None:  # the PSNR judged is that format's decoder output
        options["format_version"] = format_version
    by_psnr = target.psnr is not None
    done: dict[int, tuple[EncodedImage, Trial]] = {}

    def trial(i: int) -> tuple[EncodedImage, Trial]:
        if i not in done:
            encoded = Encoder(ladder[i], reconstruct=by_psnr, **options).encode_image(rgb)
            quality = psnr(rgb, encoded.x_hat) if by_psnr else None
            done[i] = (encoded, Trial(ladder[i].model_id, encoded.bpp, quality))
        return done[i]

    def meets(i: int) -> bool:
        t = trial(i)[1]
        return t.psnr >= target.psnr if by_psnr else t.bpp <= target.bpp

    # PSNR: the first model that meets the target (the cheapest). bpp: the last one that does
    # (the best within the budget); search for the first one that does not, instead.
    lo, hi = 0, len(ladder)  # the answer is in [lo, hi]
    while lo < hi:
        mid = (lo + hi) // 2
        if meets(mid) == by_psnr:
            hi = mid
        else:
            lo = mid + 1
    chosen = (min(lo, len(ladder) - 1) if by_psnr else max(lo - 1, 0))
    encoded, chosen_trial = trial(chosen)
    return TargetedImage(encoded, chosen_trial.model_id, target, meets(chosen), chosen_trial.psnr,
                         [done[i][1] for i in sorted(done)])
