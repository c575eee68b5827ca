"""Latent refinement: a slower encoder that finds a better latent for the same decoder.

g_a is amortised: one pass predicts a latent that is good for images on average, and a small
model trained briefly (the shipped ones) leaves much on the table. Here the latent of one
image is improved by gradient descent on the model's own training objective, bits + lambda x
MSE (MSE on the 0..255 scale), with the model frozen (Campos et al. 2019, "Content adaptive
optimization for neural image compression"; Yang et al. 2020, "Improving inference for neural
image compression"). The decoder is untouched: any integer latent codes and decodes exactly,
so a refined stream is an ordinary stream of the same format, read by every m2t that reads it,
and its decoded pixels are as portable as any other's.

Only the encoder's choice changes, and it stays a float computation: like g_a itself, its
result may differ in a few values between machines, never between encoder and decoder.

The objective is the training loss on one image (model.M2TCodec.forward):
* rate: the float entropy model's bits for y + U(-1/2, 1/2), with round(y) as the context
  (straight-through), in M2T's one teacher-forced pass. MT models are refused: an MT pass
  gives the rate of one coding step's group only, and an estimate from one step drawn at random
  per pass (scaled by S) cost bits on Kodak (mt-small-q2: +14 % bits for +0.24 dB,
  docs/models.md); all S passes per step would be S times the work;
* distortion: the float g_s on round(y) (straight-through);
* lambda: the one the model was trained for (the checkpoint's `info["lambda"]`, or a
  variable-rate model's `rate_lambdas` at the quality).
Adam on y, `lr` for the first half of the steps, then linearly down to zero; the noise from a
generator seeded per call, so a refinement repeats exactly on one machine.

Memory stays bounded on large images: the rate runs over bands of windows and the distortion
over g_s's overlapping tiles (tiling.py), each piece's gradient added into y's in turn.
"""

from __future__ import annotations

import numpy as np
import torch

from . import coding, tiling
from . import network as N
from . import rate as R
from .entropy_coding import MAX_ABS_SYMBOL
from .model import M2TCodec, ste_round

DEFAULT_LR = 0.015  # latent units per step; chosen on val (docs/models.md: latent refinement)
WINDOW_COLUMNS = 16  # windows per rate pass (a band's columns): a memory bound only


class RefineError(ValueError):
    """A refinement that cannot run: an MT model, or one that does not record its training lambda."""


def check_model(model: M2TCodec, need_lambda: bool = True) -> None:
    """RefineError unless refinement serves `model`: an M2T model (MT: see the module
    docstring) that knows its lambda (a fixed-rate model's checkpoint records it) where
    `need_lambda`."""
    if model.cfg.mode != "m2t":
        raise RefineError(f"model {model.model_id!r} is an MT model: latent refinement is for M2T models (an MT pass "
                          "rates one coding step, and refining on such estimates cost bits: docs/models.md)")
    if need_lambda and not model.rate_levels and model.rd_lambda is None:
        raise RefineError(f"model {model.model_id!r} does not record the lambda it was trained for (its checkpoint's "
                          "info has no 'lambda'): pass one")


def model_lambda(model: M2TCodec, quality_code: int | None = None) -> float:
    """The rate-distortion weight `model` was trained for: a fixed-rate model's from its
    checkpoint (`model.rd_lambda`), a variable-rate model's at `quality_code` (check_model first)."""
    check_model(model)
    model.check_quality_code(quality_code)
    if model.rate_levels:
        quality = torch.tensor([quality_code / R.QUALITY_ONE], dtype=torch.float64)
        return float(R.lambda_of(quality, model.cfg.rate_lambdas)[0])
    return model.rd_lambda


def refine_latent(model: M2TCodec, rgb: np.ndarray, y: torch.Tensor, steps: int, *, lmbda: float | None = None,
                  quality_code: int | None = None, lr: float = DEFAULT_LR, seed: int = 0) -> torch.Tensor:
    """g_a's output y (C, h, w) for the RGB uint8 image `rgb` (H, W, 3) (a variable-rate
    model's scaled by the gains of `quality_code`: what the stream codes) -> y refined by
    `steps` gradient steps, float (C, h, w), not rounded. `lmbda` defaults to model_lambda."""
    if steps < 0 or lr <= 0:
        raise ValueError(f"steps must be >= 0 and lr > 0, got steps={steps}, lr={lr}")
    H, W = rgb.shape[:2]
    if y.shape[-2:] != coding.latent_size(H, W):
        raise ValueError(f"a {W}x{H} image has a {coding.latent_size(H, W)} latent, got {tuple(y.shape[-2:])}")
    if lmbda is None:
        lmbda = model_lambda(model, quality_code)  # checks the model too
    else:
        check_model(model, need_lambda=False)
        lmbda = float(lmbda)
    with torch.inference_mode(False), torch.enable_grad():
        y = y.detach().clone().float().requires_grad_(False)  # a normal tensor, even from inference mode
        if steps == 0:
            return y
        objective = _Objective(model, rgb, lmbda, quality_code, seed)
        opt = torch.optim.Adam([y], lr=lr)
        for k in range(steps):
            for group in opt.param_groups:  # lr for the first half, then linearly to 0
                group["lr"] = lr * min(1.0, 2.0 * (steps - k) / (steps + 1))
            y.grad = objective.gradient(y)
            opt.step()
        return y.detach()


def rounded(y: torch.Tensor) -> torch.Tensor:
    """A refined latent as the stream codes it: rounded, clamped to the coder's range."""
    return torch.round(y).clamp(-MAX_ABS_SYMBOL, MAX_ABS_SYMBOL)


def refined_y_hat(model: M2TCodec, rgb: np.ndarray, y: torch.Tensor, steps: int,
                  quality_code: int | None = None) -> torch.Tensor:
    """g_a's output y (C, h, w) for `rgb`, before a variable-rate model's gains -> the y_hat
    (C, h, w) the stream codes: scaled by the gains of `quality_code`, refined, rounded."""
    return rounded(refine_latent(model, rgb, model._gained(y, quality_code), steps, quality_code=quality_code))


class _Objective:
    """bits + lambda x (sum of squared errors on 0..255) / 3, both per pixel, of one image."""

    def __init__(self, model: M2TCodec, rgb: np.ndarray, lmbda: float, quality_code: int | None, seed: int):
        self.model, self.lmbda = model, lmbda
        self.H, self.W = rgb.shape[:2]
        self.x = torch.from_numpy(np.array(rgb, dtype=np.float32)).to(model.device).permute(2, 0, 1)  # (3, H, W)
        self.gen = torch.Generator(device=model.device).manual_seed(seed)
        self.inverse, self.rate_of = _float_rate(model, quality_code)

    def gradient(self, y: torch.Tensor) -> torch.Tensor:
        """d(objective)/dy (C, h, w): the rate's bands of windows, then g_s's tiles."""
        grad = torch.zeros_like(y)
        noise = torch.rand(y.shape, generator=self.gen, device=y.device) - 0.5
        ww = self.model.cfg.window
        h, w = y.shape[-2:]
        for r0 in range(0, h, ww):
            for c0 in range(0, w, ww * WINDOW_COLUMNS):
                rows, cols = slice(r0, r0 + ww), slice(c0, c0 + ww * WINDOW_COLUMNS)
                part = y[:, rows, cols].detach().requires_grad_(True)
                bits = self._bits(part, noise[:, rows, cols])
                grad[:, rows, cols] += torch.autograd.grad(bits / (self.H * self.W), part)[0]
        for (cy0, cy1), (cx0, cx1), (ty0, ty1), (tx0, tx1) in tiling.synthesis_tiles(self.model.g_s, h, w):
            part = y[:, ty0:ty1, tx0:tx1].detach().requires_grad_(True)
            sse = self._squared_error(part, (ty0, tx0), (cy0, cy1), (cx0, cx1))
            grad[:, ty0:ty1, tx0:tx1] += torch.autograd.grad(sse * (self.lmbda / (3 * self.H * self.W)), part)[0]
        return grad

    def _bits(self, y: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The float entropy model's bits for y + noise (C, h', w'), whole windows of the latent."""
        model, ww = self.model, self.model.cfg.window
        ctx = coding.latent_windows(ste_round(y), ww)  # (b, L, C)
        target = coding.latent_windows(y + noise, ww)  # (b, L, C)
        counted = coding.valid_tokens(y.shape[-2:], ww, y.device)  # (b, L)
        ops = N.FloatOps(model.entropy_model, model.cfg, model.layout, model.exact, rate=self.rate_of(ctx.shape[0]))
        likelihood = N.mixture_likelihood(target, N.m2t_teacher_forced(ops, ctx))  # (b, L, C)
        return -(torch.log2(likelihood) * counted[..., None]).sum()

    def _squared_error(self, y: torch.Tensor, origin: tuple[int, int], rows: tuple[int, int],
                       cols: tuple[int, int]) -> torch.Tensor:
        """Sum of squared errors (0..255) of g_s(round(y)) of a tile whose first latent is at
        `origin`, over the pixels of its core latents `rows` x `cols` inside the image."""
        s = tiling.SCALE
        y_hat = ste_round(y)[None]
        x_hat = self.model.g_s(y_hat if self.inverse is None else y_hat * self.inverse)[0]  # (3, 16 h', 16 w')
        py0, py1 = rows[0] * s, min(self.H, rows[1] * s)
        px0, px1 = cols[0] * s, min(self.W, cols[1] * s)
        crop = x_hat[:, py0 - origin[0] * s:py1 - origin[0] * s, px0 - origin[1] * s:px1 - origin[1] * s]
        return ((crop * 255.0 - self.x[:, py0:py1, px0:px1]) ** 2).sum()


def _float_rate(model: M2TCodec, quality_code: int | None):
    """(g_s's inverse gains (1, C, 1, 1), a function of a window count giving the windows'
    rate.FloatRate) of a variable-rate model at `quality_code`, as its training forward has
    them; (None, a function giving None) for a fixed-rate model."""
    if not model.rate_levels:
        return None, lambda n: None
    quality = torch.tensor([quality_code / R.QUALITY_ONE], device=model.device)
    with torch.no_grad():
        v, embed = model.float_rate(quality)  # (1, C), (1, D)
    return torch.exp2(-v)[:, :, None, None], lambda n: R.FloatRate(v.expand(n, -1), embed.expand(n, -1))
