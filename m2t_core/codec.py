"""The M2T / MT image codec: transforms + transformer entropy model + entropy coding.

Contract (as in CompressAI): `forward(x)` returns the reconstruction and likelihoods for
training; `compress(images) -> list[bytes]` and `decompress(bytes) -> uint8 (H, W, 3)` mirror
each other.

Bit-exactness (format version 2, written by every model with an exact entropy model): the
distribution parameters come from `exact.ExactEntropyModel`, whose arithmetic is integer
(exact.py), so the encoder may compute them any way it likes: M2T's single teacher-forced
pass over many windows at once, or the decoder's incremental loop; any batch, thread count
or device gives the same integers. Only g_a and g_s stay float: the latent is whatever g_a
produced, and decoded pixels may differ in the last bit between devices (like JPEG
decoders). A CRC of the image size and the latent in the header remains as an integrity
check.

Format version 1 (legacy, decode only): the parameters came from the float transformer, so
its encoder ran the decoder's own incremental computation with the same shapes (one image's
windows, `window_batch` at a time, one CPU thread); such streams decode only on the kind of
machine that wrote them (`_code_latent_v1`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import bitstream as bs
from .config import ModelConfig
from . import exact as X
from .entropy_coding import (MAX_ABS_SYMBOL, MEAN_STEPS, SymbolDecoder, SymbolEncoder, mixture_mean_q,
                             snap_integer, snap_params)
from .image_io import ImageLike, to_rgb_array
from .transformer import DecodeState, EntropyTransformer, MixtureParams, mixture_likelihood
from .transforms import CPU_TRANSFORMS, FROZEN_TRANSFORMS, AnalysisTransform, SynthesisTransform, frozen_for_inference

DEFAULT_WINDOW_BATCH = 8  # format version 1 only
UNTRAINED_MODEL_ID = "untrained"
# On CPU every coding computation runs on exactly this many threads: matrix products and
# convolutions give different last bits for different thread counts (measured with
# torch 2.13/MKL for some row counts), so the thread count must not be the caller's.
# Parallelism comes from coding several images at once in separate processes.
CODING_THREADS = 1


@contextlib.contextmanager
def deterministic_kernels(device: torch.device | None = None):
    """Pin what decides the last bits while coding, restored afterwards: no TF32, no autotuned
    convolution algorithms, and on CPU a fixed thread count (CODING_THREADS)."""
    threads = torch.get_num_threads()
    pin_threads = (device is None or device.type == "cpu") and threads != CODING_THREADS
    if pin_threads:
        torch.set_num_threads(CODING_THREADS)
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) = saved
        if pin_threads:
            torch.set_num_threads(threads)


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity gradient in the backward pass."""
    return x + (torch.round(x) - x).detach()


def to_windows(y: torch.Tensor, window: int) -> torch.Tensor:
    """(B, C, h, w) with h, w multiples of `window` -> (B * nh * nw, window**2, C)."""
    B, C, h, w = y.shape
    nh, nw = h // window, w // window
    t = y.view(B, C, nh, window, nw, window)  # (B, C, nh, ww, nw, ww)
    return t.permute(0, 2, 4, 3, 5, 1).reshape(B * nh * nw, window * window, C)  # (B*nW, L, C)


def from_windows(t: torch.Tensor, batch: int, h: int, w: int, window: int) -> torch.Tensor:
    """Inverse of to_windows: (B * nh * nw, window**2, ...) -> (B, ..., h, w)."""
    nh, nw = h // window, w // window
    rest = t.shape[2:]
    t = t.reshape(batch, nh, nw, window, window, *rest)  # (B, nh, nw, ww, ww, *rest)
    t = t.permute(0, *range(5, 5 + len(rest)), 1, 3, 2, 4)  # (B, *rest, nh, ww, nw, ww)
    return t.reshape(batch, *rest, h, w)


def pad_latent(y: torch.Tensor, window: int) -> torch.Tensor:
    """Zero-pad (B, C, h, w) on the bottom/right to multiples of `window`."""
    h, w = y.shape[-2:]
    return F.pad(y, (0, (-w) % window, 0, (-h) % window))


@dataclass
class EncodedImage:
    bitstream: bytes
    y_hat: torch.Tensor  # (C, h, w) int32 on CPU
    height: int
    width: int

    @property
    def bpp(self) -> float:
        return 8.0 * len(self.bitstream) / (self.height * self.width)


class M2TCodec(nn.Module):
    def __init__(self, cfg: ModelConfig, model_id: str = UNTRAINED_MODEL_ID):
        super().__init__()
        self.cfg = cfg
        self.model_id = model_id
        self.g_a = AnalysisTransform(cfg.N, cfg.C, cfg.blocks_per_stage, cfg.attention_blocks)
        self.g_s = SynthesisTransform(cfg.N, cfg.C, cfg.blocks_per_stage, cfg.attention_blocks)
        self.entropy_model = EntropyTransformer(cfg)
        # The exact (integer) entropy model that codes format version 2, built from
        # entropy_model's weights and kept in sync with them (sync_exact).
        self.exact: X.ExactEntropyModel | None = X.ExactEntropyModel(cfg, self.entropy_model)
        self.exact.init_exponents(self.entropy_model)
        self.exact.export_from(self.entropy_model)
        # Float weights of a converted model's original entropy model: decodes format
        # version 1 streams written before the conversion (None where there are none).
        self.legacy_entropy_model: EntropyTransformer | None = None
        self.qat = False  # training: quantisation-aware forward through the exact model's grid
        self._digest_cache: dict[str, tuple[tuple, bytes]] = {}
        self._exact_source = self._entropy_fingerprint()
        self._frozen: dict[str, tuple[tuple, torch.jit.ScriptModule]] = {}  # CPU inference g_a / g_s

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ------------------------------------------------------------------ training

    def forward(self, x: torch.Tensor, mt_mask_range: tuple[float, float] = (0.05, 0.99)) -> dict:
        """x (B, 3, H, W) in [0, 1], H and W multiples of 16.

        Returns x_hat (B, 3, H, W), likelihoods {"y": (B, C, h, w)} and rate_mask
        (B, 1, h, w) bool: the latent positions whose rate counts (all of them for M2T;
        the masked ones for MT). In training mode the likelihood is of y + U(-1/2, 1/2);
        in eval mode, of round(y). The transformer's context is round(y) (straight-through).
        """
        if x.shape[-1] % bs.DOWNSAMPLING or x.shape[-2] % bs.DOWNSAMPLING:
            raise ValueError(f"forward needs H and W multiples of 16, got {tuple(x.shape[-2:])}")
        w = self.cfg.window
        y = self.g_a(x)
        y_hat = ste_round(y)
        y32 = y.float()
        y_rate = y32 + torch.empty_like(y32).uniform_(-0.5, 0.5) if self.training else torch.round(y32)
        B, C, h, wd = y.shape
        valid = pad_latent(torch.ones(B, 1, h, wd, device=x.device), w)
        ctx = to_windows(pad_latent(y_hat, w), w)  # (B*nW, L, C)
        target = to_windows(pad_latent(y_rate, w), w)  # (B*nW, L, C)
        H2, W2 = valid.shape[-2:]
        qat_ops = X.FloatOps(self.exact, self.entropy_model, quant=True) if self.qat else None
        if self.cfg.mode == "m2t":
            if qat_ops is not None:
                params = MixtureParams(*X.m2t_teacher_forced(qat_ops, ctx.float()))
            else:
                params = self.entropy_model.m2t_forward(ctx)
            rate_mask = valid
        else:
            masked = self._random_mt_mask(ctx.shape[0], mt_mask_range, x.device)  # (B*nW, L)
            if qat_ops is not None:
                params = MixtureParams(*X.mt_forward(qat_ops, ctx.float(), masked))
            else:
                params = self.entropy_model.mt_forward(ctx, masked)
            rate_mask = valid * from_windows(masked[..., None].float(), B, H2, W2, w)
        # The rate in fp32 even under autocast: bf16 would round y - mean at |y| > ~32.
        with torch.autocast(x.device.type, enabled=False):
            params32 = MixtureParams(*(t.float() for t in (params.means, params.log_scales, params.logits)))
            lik = mixture_likelihood(target.float(), params32)  # (B*nW, L, C)
        lik = from_windows(lik, B, H2, W2, w)[..., :h, :wd]  # (B, C, h, w)
        return {
            "x_hat": self.g_s(y_hat),
            "likelihoods": {"y": lik},
            "rate_mask": rate_mask[..., :h, :wd] > 0,
        }

    def _random_mt_mask(self, n: int, mask_range: tuple[float, float], device) -> torch.Tensor:
        L = self.cfg.tokens_per_window
        lo, hi = mask_range
        ratio = torch.empty(n, 1, device=device).uniform_(lo, hi)
        count = torch.clamp((ratio * L).ceil(), 1, L)
        ranks = torch.rand(n, L, device=device).argsort(dim=1).argsort(dim=1)
        return ranks < count  # (n, L) True = masked

    # ------------------------------------------------------------------ identity

    def _hashed_state(self, version: int) -> dict[str, torch.Tensor]:
        """The tensors that define the numbers of bitstream format `version`.

        Version 2: the transforms and the exact model's integers (the float entropy weights
        are derived from those). Version 1: the transforms and the float entropy model (a
        converted model's legacy weights, under their original names), so a converted
        model keeps the hash its old streams carry."""
        state = self.state_dict()
        transforms = {k: v for k, v in state.items() if k.startswith(("g_a.", "g_s."))}
        if version == 2:
            return {**transforms, **{k: v for k, v in state.items() if k.startswith("exact.")}}
        prefix = "legacy_entropy_model." if self.legacy_entropy_model is not None else "entropy_model."
        legacy = {"entropy_model." + k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        return {**transforms, **legacy}

    def weights_digest(self, version: int | None = None) -> bytes:
        """SHA-256 over the config and the tensors of `_hashed_state(version)` (names,
        shapes, float32 bytes for float tensors, little-endian bytes for integer ones).
        Default: the version this model writes (2 and 3 share one digest; 1 for a model
        without exact model)."""
        version = min(version or 2, 2 if self.exact is not None else 1)  # 3 codes with 2's numbers
        if version == 2:
            self.sync_exact()  # the integers follow the float entropy weights (training, edits)
        state = self._hashed_state(version)
        # A cheap fingerprint decides whether the SHA-256 must be recomputed. Storage address
        # and version counter miss edits through `.data` and dtype round trips, so an exact
        # integer sum of every tensor's bits is part of it too (~5 ms for 4M parameters).
        fingerprint = tuple(
            (k, t.dtype, tuple(t.shape), t.data_ptr(), _changes(t), _bit_sum(t)) for k, t in state.items()
        )
        cached = self._digest_cache.get(str(version))
        if cached is not None and cached[0] == fingerprint:
            return cached[1]
        h = hashlib.sha256(json.dumps(self.cfg.to_dict(), sort_keys=True).encode())
        for name in sorted(state):
            t = state[name].detach().cpu().contiguous()
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            if t.is_floating_point():
                h.update(t.to(torch.float32).numpy().tobytes())
            else:
                h.update(t.to(torch.int64).numpy().astype("<i8").tobytes())
        digest = h.digest()
        self._digest_cache[str(version)] = (fingerprint, digest)
        return digest

    def weights_hash(self, version: int | None = None) -> bytes:
        return self.weights_digest(version)[:8]

    # ------------------------------------------------------------------ the exact model

    def _entropy_fingerprint(self) -> tuple:
        return tuple((k, t.data_ptr(), _changes(t), _bit_sum(t)) for k, t in self.entropy_model.state_dict().items())

    def sync_exact(self) -> None:
        """Re-export the exact model if the float entropy weights changed since (training),
        with the exponents it has. Deterministic: elementwise rounding only."""
        if self.exact is None:
            return
        fingerprint = self._entropy_fingerprint()
        if fingerprint != self._exact_source:
            self.exact.export_from(self.entropy_model)
            self._exact_source = fingerprint

    def mark_exact_synced(self) -> None:
        """The float weights were just set from the exact model (load_into): in sync."""
        self._exact_source = self._entropy_fingerprint()

    @torch.no_grad()
    def calibrate_exact(self, tokens: torch.Tensor) -> dict[str, float]:
        """Choose the exact model's exponents from latent windows `tokens` (B, L, C) of
        training images, and export. Returns the observed activation maxima."""
        if self.exact is None:
            self.exact = X.ExactEntropyModel(self.cfg, self.entropy_model).to(self.device)
        observed = self.exact.calibrate(self.entropy_model, tokens)
        self._exact_source = self._entropy_fingerprint()
        return observed

    # ------------------------------------------------------------------ coding core

    def _code_latent_v1(self, latent_shape: tuple[int, int, int], window_batch: int,
                     code_step: Callable[[np.ndarray, MixtureParams, torch.Tensor, list[int]], torch.Tensor],
                     use_cache: bool = True) -> torch.Tensor:
        """Run the coding schedule over one image's latent; shared by encoder and decoder.

        `code_step(window_ids, params, valid, group)` gets the parameters of one step
        (b, n_i, C, K) for windows `window_ids` and returns their values (b, n_i, C);
        the encoder returns the true values (after coding them), the decoder decodes them.
        `use_cache=False` recomputes every step from scratch (M2T only; slower, for
        measurement): its numbers differ in the last bits from the cached path, so it is a
        property of the bitstream (header flag), not a choice of the decoder.
        Returns y_hat as (C, h, w) float32, contiguous.
        """
        C, h, w = latent_shape
        ww = self.cfg.window
        device = self.device
        valid = to_windows(pad_latent(torch.ones(1, 1, h, w, device=device), ww), ww)[..., 0] > 0  # (nW, L)
        num_windows = valid.shape[0]
        decoded = torch.zeros(num_windows, ww * ww, C, device=device)  # (nW, L, C)
        entropy_model = self.legacy_entropy_model or self.entropy_model
        groups = [torch.as_tensor(g, device=device) for g in entropy_model.sched.groups]
        for start in range(0, num_windows, window_batch):
            ids = np.arange(start, min(start + window_batch, num_windows))
            tokens = torch.zeros(len(ids), ww * ww, C, device=device)  # (b, L, C)
            state = DecodeState()
            for group in groups:
                params = entropy_model.step(tokens, state, use_cache=use_cache)  # (b, n_i, C, K)
                values = code_step(ids, params, valid[start:start + len(ids)][:, group], group)
                tokens[:, group] = values
            decoded[start:start + len(ids)] = tokens
        hp, wp = h + (-h) % ww, w + (-w) % ww
        # Contiguous: a strided view (one-window images) makes the convolutions of g_s
        # pick another kernel, and the last bits of the reconstruction would differ.
        return from_windows(decoded, 1, hp, wp, ww)[0, :, :h, :w].contiguous()  # (C, h, w)

    @staticmethod
    def _flat_params(params: MixtureParams, valid: torch.Tensor) -> MixtureParams:
        """Keep valid tokens, flatten to (n_symbols, K) in (window, slot, channel) order."""
        K = params.means.shape[-1]
        return MixtureParams(*(t[valid].reshape(-1, K) for t in (params.means, params.log_scales, params.logits)))

    def _check_codable(self) -> None:
        if self.training:
            raise RuntimeError("call model.eval() before compress/decompress")

    def _check_exact(self) -> None:
        if self.exact is None:
            raise bs.BitstreamError(
                f"model {self.model_id!r} has no exact entropy model (a checkpoint from before format "
                "version 2): convert it first (python -m pipeline.convert_exact, see docs/models.md)")

    # ------------------------------------------------------------------ compress

    def analysis(self, rgb: np.ndarray) -> torch.Tensor:
        """RGB uint8 (H, W, 3) -> y_hat (C, h, w) rounded and clamped, float32."""
        from . import tiling  # large images run in overlapping tiles: memory does not grow with them

        rgb = rgb if rgb.flags.writeable else rgb.copy()  # torch wants writable memory
        x = torch.from_numpy(rgb).to(self.device).permute(2, 0, 1)[None]  # (1, 3, H, W) uint8
        # edge-padded to multiples of 16, scaled to [0, 1]
        y = tiling.analysis(self.g_a, x, run=self._inference_transform("g_a"))
        return torch.round(y).clamp(-MAX_ABS_SYMBOL, MAX_ABS_SYMBOL)

    def synthesis(self, y_hat: torch.Tensor, height: int, width: int, frozen: bool = True) -> np.ndarray:
        """y_hat (C, h, w) -> RGB uint8 (height, width, 3). `frozen=False`: the eager g_s
        (format version 1 decodes its streams with it, as it was written)."""
        from . import tiling  # large images run in overlapping tiles: memory does not grow with them

        run = self._inference_transform("g_s") if frozen else None
        x_hat = tiling.synthesis(self.g_s, y_hat[None].to(self.device, torch.float32).contiguous(), height, width,
                                 run=run)
        return x_hat.permute(1, 2, 0).cpu().numpy()  # (3, height, width) uint8 -> (height, width, 3)

    @torch.inference_mode()
    def analysis_batch(self, rgbs: Sequence[np.ndarray], batch: int | None = None) -> list[torch.Tensor]:
        """analysis() of many RGB images: images of one size go through g_a `batch` at a time
        (default TRANSFORM_BATCH[device type]: 1 on a CPU, where a batch is no faster, measured
        in bench/codec_speed.py; many on a GPU). Returns y_hat (C, h, w) per image, in order.
        A batch may change g_a's float rounding and so a few latent values (see
        bench/batch_consistency.py); any latent codes and decodes exactly."""
        from . import tiling

        batch = batch or TRANSFORM_BATCH.get(self.device.type, 1)
        out: list[torch.Tensor | None] = [None] * len(rgbs)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, rgb in enumerate(rgbs):
            by_size.setdefault(rgb.shape[:2], []).append(i)
        run = self._inference_transform("g_a")
        for idx in by_size.values():
            for s in range(0, len(idx), batch) if batch > 1 else ():
                part = idx[s:s + batch]
                if len(part) < 2:
                    continue
                x = torch.from_numpy(np.stack([rgbs[i] for i in part])).to(self.device).permute(0, 3, 1, 2)  # (B, 3, H, W)
                y = tiling.analysis_batch(self.g_a, x, run=run)
                if y is None:
                    break  # a size that runs in tiles: one image at a time
                y = torch.round(y).clamp(-MAX_ABS_SYMBOL, MAX_ABS_SYMBOL)
                for k, i in enumerate(part):
                    out[i] = y[k]
        return [y if y is not None else self.analysis(rgbs[i]) for i, y in enumerate(out)]

    @torch.inference_mode()
    def synthesis_batch(self, latents: Sequence[tuple[torch.Tensor, int, int]], batch: int | None = None) -> list[np.ndarray]:
        """synthesis() of many (y_hat (C, h, w), H, W): latents of one size through g_s `batch`
        at a time (default TRANSFORM_BATCH[device type]). RGB uint8 (H, W, 3) per latent."""
        from . import tiling

        batch = batch or TRANSFORM_BATCH.get(self.device.type, 1)
        out: list[np.ndarray | None] = [None] * len(latents)
        by_size: dict[tuple, list[int]] = {}
        for i, (y, H, W) in enumerate(latents):
            by_size.setdefault((tuple(y.shape), H, W), []).append(i)
        run = self._inference_transform("g_s")
        for (_, H, W), idx in by_size.items():
            for s in range(0, len(idx), batch) if batch > 1 else ():
                part = idx[s:s + batch]
                if len(part) < 2:
                    continue
                y = torch.stack([latents[i][0] for i in part]).to(self.device, torch.float32)  # (B, C, h, w)
                x_hat = tiling.synthesis_batch(self.g_s, y, H, W, run=run)
                if x_hat is None:
                    break
                x_hat = x_hat.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
                for k, i in enumerate(part):
                    out[i] = x_hat[k]
        return [x if x is not None else self.synthesis(latents[i][0], latents[i][1], latents[i][2])
                for i, x in enumerate(out)]

    @torch.inference_mode()
    def encode_images(self, images: Sequence[ImageLike], format_version: int = bs.FORMAT_VERSION,
                      max_pixels: int = bs.DEFAULT_MAX_PIXELS, batch: int | None = None,
                      adaptive_order: bool = False) -> list[EncodedImage]:
        """Encode many images, batched on the device: g_a (`analysis_batch`), then the entropy
        model over the windows of all of them (`plan_latents`), then range coding
        (`code_plan`). Each result is what encode_image gives for the same latent."""
        self._check_codable()
        self._check_exact()
        if format_version not in (2, 3):
            raise ValueError(f"encode_images writes format version 2 or 3, not {format_version}")
        if adaptive_order and (self.cfg.mode != "mt" or format_version < 3):
            raise ValueError("adaptive_order needs an MT model and format version 3")
        rgbs = [to_rgb_array(img) for img in images]
        for rgb in rgbs:
            bs.check_image_size(rgb.shape[0], rgb.shape[1], max_pixels)
        ys = self.analysis_batch(rgbs, batch)
        plans = self.plan_latents([(y, rgb.shape[0], rgb.shape[1]) for y, rgb in zip(ys, rgbs)], adaptive_order)
        return [code_plan(plan, format_version) for plan in plans]

    def transforms_implementation(self) -> str:
        """How synthesis() runs g_s here, which decides the decoded pixels: "frozen" or
        "eager" (see transforms.FROZEN_TRANSFORMS: g_s runs eagerly; so do GPUs)."""
        if self.device.type != "cpu" or CPU_TRANSFORMS != "frozen" or "g_s" not in FROZEN_TRANSFORMS:
            return "eager"
        with torch.inference_mode():
            return "frozen" if self._inference_transform("g_s") is not None else "eager"

    def numerics(self) -> dict:
        """numerics_environment() of this codec's device and transforms: what decides the
        decoded pixels' last bits (an archive records it; verify compares pixels under it)."""
        return numerics_environment(self.device, self.transforms_implementation())

    def _inference_transform(self, name: str):
        """The frozen CPU form of g_a (or of any transform in FROZEN_TRANSFORMS; built on first
        use and again whenever the weights changed), or None to run the module itself."""
        module = getattr(self, name)
        if self.device.type != "cpu" or CPU_TRANSFORMS != "frozen" or name not in FROZEN_TRANSFORMS \
                or torch.is_grad_enabled() or module.training:
            return None
        if self._frozen.get("failed"):
            return None
        fingerprint = tuple((t.data_ptr(), _changes(t, bits=True)) for t in module.state_dict().values())
        built = self._frozen.get(name)
        if built is None or built[0] != fingerprint:
            in_channels = 3 if name == "g_a" else self.cfg.C
            try:
                frozen = frozen_for_inference(module, in_channels)
            except Exception as exc:  # e.g. a torch without TorchScript: the eager modules, said once
                warnings.warn(f"running g_a/g_s eagerly: freezing them for CPU inference failed ({exc})")
                self._frozen["failed"] = (fingerprint, None)
                return None
            built = self._frozen[name] = (fingerprint, frozen)
        return built[1]

    @torch.inference_mode()
    def encode_image(self, image: ImageLike, window_batch: int = DEFAULT_WINDOW_BATCH,
                     max_pixels: int = bs.DEFAULT_MAX_PIXELS, use_cache: bool = True,
                     format_version: int = bs.FORMAT_VERSION, adaptive_order: bool = False) -> EncodedImage:
        """Encode one image. Format version 3 (default) is portable and progressive; 2 is
        portable; `window_batch` and `use_cache` only matter for the legacy version 1 (kept
        for tests of old streams). `adaptive_order` (MT only, version 3): choose each step's
        positions by the model's confidence (MaskGIT) instead of the fixed schedule."""
        self._check_codable()
        rgb = to_rgb_array(image)
        H, W = rgb.shape[:2]
        bs.check_image_size(H, W, max_pixels)
        if not 1 <= window_batch <= bs.MAX_WINDOW_BATCH:
            raise ValueError(f"window_batch must be in 1..{bs.MAX_WINDOW_BATCH}")
        if adaptive_order and (self.cfg.mode != "mt" or format_version < 3):
            raise ValueError("adaptive_order needs an MT model and format version 3 (M2T's attention "
                             "mask fixes its order)")
        if format_version == 1:
            return self._encode_v1(rgb, window_batch, max_pixels, use_cache)
        if format_version not in (2, 3):
            raise ValueError(f"cannot write bitstream format version {format_version} (writes 1, 2 or 3)")
        self._check_exact()
        y_hat = self.analysis(rgb)
        return self.encode_latent(y_hat, H, W, format_version, adaptive_order)

    def encode_latent(self, y_hat: torch.Tensor, H: int, W: int, format_version: int = bs.FORMAT_VERSION,
                      adaptive_order: bool = False) -> EncodedImage:
        """y_hat (C, h, w) integer-valued -> format version 2 or 3 bitstream: the device stage
        (`plan_latents`) then the coding stage (`code_plan`) for one image."""
        return code_plan(self.plan_latents([(y_hat, H, W)], adaptive_order)[0], format_version)

    @torch.inference_mode()
    def plan_latents(self, latents: Sequence[tuple[torch.Tensor, int, int]], adaptive_order: bool = False,
                     windows_per_pass: int | None = None) -> list["CodingPlan"]:
        """The device stage of encoding: for each (y_hat (C, h, w), H, W), every symbol of every
        chunk and step with its integer parameters, moved to the CPU for `code_plan`.

        The windows of all the images go through the entropy model together, up to
        `windows_per_pass` at a time (default: WINDOWS_PER_PASS[device type]), each image's
        chunks whole. The exact model's integers do not depend on what else is in a pass, so
        the plan of an image, and the bytes coded from it, are the same in any batch.

        Payload order (what `code_plan` writes): the windows in raster order, CHUNK_WINDOWS at
        a time; within a chunk, step by step (each step's windows in order, then position
        within the group, then channel). M2T's parameters come from one teacher-forced pass;
        MT runs the decoder's loop (the encoder knows every token, so no coding is needed
        between its steps)."""
        self._check_codable()
        self._check_exact()
        if adaptive_order and self.cfg.mode != "mt":
            raise ValueError("adaptive_order needs an MT model (M2T's attention mask fixes its order)")
        self.sync_exact()
        ww, C = self.cfg.window, self.cfg.C
        identity = (self.model_id, self.weights_hash(2))
        plans: list[CodingPlan] = []
        chunks: list[tuple[CodingPlan, int, torch.Tensor, torch.Tensor]] = []
        for y_hat, H, W in latents:
            y_int = y_hat.to(self.device, torch.int32)
            truth = to_windows(pad_latent(y_int[None], ww), ww)  # (nW, L, C) int32
            valid = _valid_tokens(y_hat.shape[-2:], ww, y_int.device)  # (nW, L)
            starts = range(0, truth.shape[0], bs.CHUNK_WINDOWS)
            plan = CodingPlan(*identity, H, W, y_int.cpu(), truth.shape[0], [[] for _ in starts], adaptive_order,
                              y_int.device.type == "cuda")
            plans.append(plan)
            for c, start in enumerate(starts):
                chunks.append((plan, c, truth[start:start + bs.CHUNK_WINDOWS], valid[start:start + bs.CHUNK_WINDOWS]))
        limit = windows_per_pass or WINDOWS_PER_PASS.get(self.device.type, bs.CHUNK_WINDOWS)
        ops = X.CodingOps(self.exact)
        groups = self._groups(self.device)
        for part in _passes(chunks, lambda c: c[2].shape[0], limit):
            truth = torch.cat([c[2] for c in part])  # (b, L, C)
            keep = torch.cat([c[3] for c in part])  # (b, L)
            bounds = np.cumsum([0] + [c[2].shape[0] for c in part])

            def record(step: int, params: X.IntParams, positions: torch.Tensor) -> torch.Tensor:
                values = truth.gather(1, positions[..., None].expand(-1, -1, C))  # (b, n_i, C)
                kept = keep.gather(1, positions)  # (b, n_i)
                for (plan, c, _, _), a, b in zip(part, bounds[:-1], bounds[1:]):
                    k = kept[a:b]
                    flat = params.index(slice(a, b)).flat(k)
                    plan.steps[c].append((values[a:b][k].reshape(-1).to("cpu", torch.int64).numpy(),
                                          X.IntParams(*(t.cpu() for t in (flat.mean_q, flat.level, flat.logit_q)))))
                return values

            if self.cfg.mode == "m2t":  # every step's parameters from one pass (exact: the same)
                every = _teacher_forced(ops, truth)  # (b, L, C, K)
                for step, group in enumerate(groups):
                    record(step, every.index((slice(None), group)), group[None].expand(truth.shape[0], -1))
            else:
                self._run_steps(torch.zeros_like(truth), record, keep, adaptive_order)
        return plans

    def _groups(self, device) -> list[torch.Tensor]:
        return [torch.as_tensor(g, device=device) for g in self.entropy_model.sched.groups]

    def _run_steps(self, tokens: torch.Tensor, code: Callable[[int, X.IntParams, torch.Tensor], torch.Tensor],
                   valid: torch.Tensor, adaptive_order: bool = False) -> torch.Tensor:
        """The decoder's loop over one chunk of windows `tokens` (b, L, C) int32: for each
        step i, the parameters of the positions coded at step i (b, n_i) (incrementally, with
        the key/value cache for M2T), then `code(i, params, positions)` returns their values
        (b, n_i, C), written into `tokens`. Only what was written before a step is read by it.

        The positions are the schedule's group i, or with `adaptive_order` (MT) the n_i still
        masked positions the model is most confident about (`_confident_positions`): both
        sides compute them from the same exact integers."""
        ops = X.CodingOps(self.exact)
        b, L, C = tokens.shape
        if not adaptive_order:
            state = X.ExactDecodeState()
            for i, group in enumerate(self._groups(tokens.device)):
                tokens[:, group] = code(i, X.step(ops, tokens, state), group[None].expand(b, -1))
            return tokens
        if self.cfg.mode != "mt":
            raise bs.BitstreamError("the confidence-adaptive order is defined for MT models only")
        sched = self.entropy_model.sched
        rank = torch.empty(L, dtype=torch.int64, device=tokens.device)
        rank[torch.as_tensor(sched.order, device=tokens.device)] = torch.arange(L, device=tokens.device)
        masked = torch.ones(b, L, dtype=torch.bool, device=tokens.device)
        for i, n_i in enumerate(sched.sizes):
            every = X.mt_forward(ops, tokens, masked)  # (b, L, C, K)
            positions = _confident_positions(every, masked, valid, rank, n_i)  # (b, n_i)
            at = positions[..., None, None].expand(-1, -1, C, every.mean_q.shape[-1])
            params = X.IntParams(*(t.gather(1, at) for t in (every.mean_q, every.level, every.logit_q)))
            tokens.scatter_(1, positions[..., None].expand(-1, -1, C), code(i, params, positions))
            masked.scatter_(1, positions, False)
        return tokens

    def _encode_v1(self, rgb: np.ndarray, window_batch: int, max_pixels: int, use_cache: bool) -> EncodedImage:
        """Legacy format version 1 (float entropy model): decodes only on the machine kind
        that wrote it. Kept to test the decoding of old streams."""
        H, W = rgb.shape[:2]
        with deterministic_kernels(self.device):
            y_hat = self.analysis(rgb)
            truth = to_windows(pad_latent(y_hat[None], self.cfg.window), self.cfg.window)  # (nW, L, C)
            encoder = SymbolEncoder()

            def encode_step(ids, params, valid, group):
                values = truth[ids[0]:ids[-1] + 1][:, group]  # (b, n_i, C)
                flat = self._flat_params(params, valid)
                encoder.encode(values[valid].reshape(-1).cpu().numpy().astype(np.int64),
                               snap_params(flat.means, flat.log_scales, flat.logits))
                return values

            coded = self._code_latent_v1(tuple(y_hat.shape), window_batch, encode_step, use_cache)
        assert torch.equal(coded, y_hat), "internal error: coded latent differs from y_hat"
        payload = encoder.finish()
        y_int = y_hat.to(torch.int32).cpu()
        header = bs.Header(
            model_id=self.model_id, weights_hash=self.weights_hash(1), height=H, width=W,
            window_batch=window_batch, payload_len=len(payload),
            latent_crc=latent_checksum(y_int), payload_crc=zlib.crc32(payload), version=1,
            flags=(bs.FLAG_CUDA if self.device.type == "cuda" else 0) | (0 if use_cache else bs.FLAG_UNCACHED),
        )
        return EncodedImage(bs.pack(header, payload), y_int, H, W)

    def compress(self, images: ImageLike | Sequence[ImageLike], window_batch: int = DEFAULT_WINDOW_BATCH,
                 max_pixels: int = bs.DEFAULT_MAX_PIXELS) -> list[bytes]:
        """One image or a batch -> one bitstream per image."""
        return [self.encode_image(img, window_batch, max_pixels).bitstream for img in _as_batch(images)]

    # ------------------------------------------------------------------ decompress

    def check_header(self, header: bs.Header) -> None:
        can_decode = self.exact is not None or header.version == 1
        if (header.model_id != self.model_id or not can_decode
                or header.weights_hash != self.weights_hash(header.version)):
            raise bs.ModelMismatchError(
                f"bitstream was written by model {header.model_id!r} (weights {header.weights_hash.hex()}, "
                f"format version {header.version}), not by {self.model_id!r} "
                f"(weights {self.weights_hash(header.version).hex() if can_decode else 'none for this version'})"
            )

    @torch.inference_mode()
    def decode_latent(self, data: bytes, max_pixels: int = bs.DEFAULT_MAX_PIXELS) -> tuple[bs.Header, torch.Tensor]:
        """Entropy-decode y_hat (C, h, w) of a whole stream and verify it against the header's
        checksum."""
        self._check_codable()
        header, payload = bs.unpack(data, max_pixels)
        self.check_header(header)
        h, w = _latent_size(header)
        if header.version == 1:
            return header, self._decode_latent_v1(header, payload, h, w)
        y_hat, _ = self._decode_latent_portable(header, payload, self.cfg.num_steps)
        return header, _checked_latent(header, y_hat)

    @torch.inference_mode()
    def decode_latents(self, streams: Sequence[bytes], max_pixels: int = bs.DEFAULT_MAX_PIXELS,
                       windows_per_pass: int | None = None) -> list:
        """decode_latent() of many whole streams, with the windows of many images in each
        transformer step (up to `windows_per_pass`, default WINDOWS_PER_PASS[device type]).
        Returns, per stream in order, (header, y_hat) or the exception decode_latent would
        raise for it: one bad stream never fails the others. The exact model's integers do
        not depend on the batch, so each latent is the one decode_latent gives."""
        self._check_codable()
        results: list = [None] * len(streams)
        batchable: dict[bool, list] = {False: [], True: []}  # by adaptive order
        for n, data in enumerate(streams):
            try:
                header, payload = bs.unpack(data, max_pixels)
                self.check_header(header)
                if header.version < 3:  # version 2 codes chunk after chunk into one coder: one at a time
                    results[n] = self.decode_latent(data, max_pixels)
                    continue
                decoders, num_windows = self._portable_decoders(header, payload, self.cfg.num_steps)
            except Exception as exc:
                results[n] = exc
                continue
            batchable[bool(header.flags & bs.FLAG_ADAPTIVE_ORDER)].append((n, header, decoders, num_windows))
        ww, C = self.cfg.window, self.cfg.C
        limit = windows_per_pass or WINDOWS_PER_PASS.get(self.device.type, bs.CHUNK_WINDOWS)
        device = self.device
        for adaptive, images in batchable.items():
            chunks = []  # (image, window start, windows, decoder)
            tokens: dict[int, torch.Tensor] = {}
            valid: dict[int, torch.Tensor] = {}
            for n, header, decoders, num_windows in images:
                tokens[n] = torch.zeros(num_windows, ww * ww, C, dtype=torch.int32, device=device)
                valid[n] = _valid_tokens(_latent_size(header), ww, device)  # (nW, L)
                for c, start in enumerate(range(0, num_windows, bs.CHUNK_WINDOWS)):
                    chunks.append((n, start, min(bs.CHUNK_WINDOWS, num_windows - start), decoders[c]))
            failed: set[int] = set()
            for part in _passes(chunks, lambda c: c[2], limit):
                part = [c for c in part if c[0] not in failed]
                if not part:
                    continue
                keep = torch.cat([valid[n][a:a + k] for n, a, k, _ in part])  # (b, L)
                bounds = np.cumsum([0] + [k for _, _, k, _ in part])

                def decode(i: int, params: X.IntParams, positions: torch.Tensor) -> torch.Tensor:
                    kept = keep.gather(1, positions)  # (b, n_i)
                    values = torch.zeros(kept.shape + (C,), dtype=torch.int32, device=device)
                    for (n, _, _, decoder), a, b in zip(part, bounds[:-1], bounds[1:]):
                        flat = params.index(slice(a, b)).flat(kept[a:b])
                        try:
                            symbols = decoder.decode(snap_integer(flat.mean_q, flat.level, flat.logit_q))
                        except Exception as exc:
                            raise _ChunkError(n, bs.BitstreamError(f"entropy decoding failed: {exc}")) from None
                        values[a:b][kept[a:b]] = torch.from_numpy(symbols.astype(np.int32)).to(device).view(-1, C)
                    return values

                try:
                    out = self._run_steps(torch.zeros(int(bounds[-1]), ww * ww, C, dtype=torch.int32, device=device),
                                          decode, keep, adaptive)
                except _ChunkError as exc:  # that image fails; its pass-mates are decoded again without it
                    failed.add(exc.image)
                    results[exc.image] = exc.error
                    for n in {c[0] for c in part} - failed:
                        header, payload = bs.unpack(streams[n], max_pixels)
                        try:
                            y_hat, _ = self._decode_latent_portable(header, payload, self.cfg.num_steps)
                            results[n] = (header, _checked_latent(header, y_hat))
                        except Exception as again:
                            results[n] = again
                        failed.add(n)
                    continue
                for (n, a, k, _), lo in zip(part, bounds[:-1]):
                    tokens[n][a:a + k] = out[lo:lo + k]
            for n, header, _, _ in images:
                if n in failed:
                    continue
                h, w = _latent_size(header)
                hp, wp = h + (-h) % ww, w + (-w) % ww
                y_hat = from_windows(tokens[n], 1, hp, wp, ww)[0, :, :h, :w].contiguous()  # (C, h, w)
                try:
                    results[n] = (header, _checked_latent(header, y_hat))
                except Exception as exc:
                    results[n] = exc
        return results

    def _portable_decoders(self, header: bs.Header, payload: bytes, steps: int) -> tuple[list, int]:
        """Format version 2 or 3: checks of the header against the model, then one entropy
        decoder per chunk (version 2: one shared) and the number of windows."""
        h, w = _latent_size(header)
        ww, S = self.cfg.window, self.cfg.num_steps
        num_windows = math.ceil(h / ww) * math.ceil(w / ww)
        num_chunks = math.ceil(num_windows / bs.CHUNK_WINDOWS)
        if header.payload_len < bs.min_payload_len(num_windows):
            # Checked before any model work: decoding time stays proportional to the bytes declared.
            raise bs.BitstreamError(
                f"corrupt bitstream: a {header.width}x{header.height} image needs at least "
                f"{bs.min_payload_len(num_windows)} payload bytes, the stream has {header.payload_len}")
        if header.version >= 3 and (header.num_steps, header.num_chunks) != (S, num_chunks):
            raise bs.BitstreamError(
                f"corrupt header: its step table has {header.num_steps} steps x {header.num_chunks} chunks, the "
                f"model codes {S} steps and a {header.width}x{header.height} image is {num_chunks} chunks")
        if header.flags & bs.FLAG_ADAPTIVE_ORDER and self.cfg.mode != "mt":
            raise bs.BitstreamError("corrupt header: the adaptive-order flag is set for an M2T model")
        self.sync_exact()
        try:
            if header.version == 2:
                return [SymbolDecoder(payload)] * num_chunks, num_windows
            return [SymbolDecoder(s) for s in _chunk_streams(header, payload, steps)], num_windows
        except Exception as exc:  # constriction rejects malformed word streams
            raise bs.BitstreamError(f"corrupt payload: {exc}") from None

    def _decode_latent_portable(self, header: bs.Header, payload: bytes, steps: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Format version 2 or 3: decode the first `steps` steps of every window; the tokens
        of later steps are the entropy model's prediction given what came before (the
        mixture mean, rounded where it is the model's context). Returns the latent as the
        model's context sees it, int32 (C, h, w), and for a preview the latent for g_s, float
        (C, h, w) with the unrounded means (None when steps = S)."""
        h, w = _latent_size(header)
        ww, C, S = self.cfg.window, self.cfg.C, self.cfg.num_steps
        decoders, num_windows = self._portable_decoders(header, payload, steps)
        adaptive = bool(header.flags & bs.FLAG_ADAPTIVE_ORDER)
        device = self.device
        valid = _valid_tokens((h, w), ww, device)  # (nW, L)
        tokens = torch.zeros(num_windows, ww * ww, C, dtype=torch.int32, device=device)
        filled = torch.zeros(num_windows, ww * ww, C, dtype=torch.float32, device=device) if steps < S else None
        for c, start in enumerate(range(0, num_windows, bs.CHUNK_WINDOWS)):  # memory bounded by one chunk
            keep_chunk = valid[start:start + bs.CHUNK_WINDOWS]
            decoder = decoders[c]

            def decode(i: int, params: X.IntParams, positions: torch.Tensor) -> torch.Tensor:
                if i >= steps:  # not in the stream (a preview): the model's prediction
                    mean_q = mixture_mean_q(params.mean_q, params.logit_q)  # (b, n_i, C) 1/MEAN_STEPS
                    filled[start:start + len(positions)].scatter_(
                        1, positions[..., None].expand(-1, -1, C), mean_q.float() / MEAN_STEPS)
                    return torch.div(2 * mean_q + MEAN_STEPS, 2 * MEAN_STEPS, rounding_mode="floor").clamp(
                        -MAX_ABS_SYMBOL, MAX_ABS_SYMBOL).to(torch.int32)
                keep = keep_chunk.gather(1, positions)  # (b, n_i)
                flat = params.flat(keep)
                try:
                    symbols = decoder.decode(snap_integer(flat.mean_q, flat.level, flat.logit_q))
                except Exception as exc:
                    raise bs.BitstreamError(f"entropy decoding failed: {exc}") from None
                values = torch.zeros(keep.shape + (C,), dtype=torch.int32, device=device)
                values[keep] = torch.from_numpy(symbols.astype(np.int32)).to(device).view(-1, C)
                if filled is not None:
                    filled[start:start + len(positions)].scatter_(
                        1, positions[..., None].expand(-1, -1, C), values.float())
                return values

            self._run_steps(tokens[start:start + bs.CHUNK_WINDOWS], decode, keep_chunk, adaptive)
        hp, wp = h + (-h) % ww, w + (-w) % ww
        y_hat = from_windows(tokens, 1, hp, wp, ww)[0, :, :h, :w].contiguous()  # (C, h, w)
        if filled is None:
            return y_hat, None
        return y_hat, from_windows(filled, 1, hp, wp, ww)[0, :, :h, :w].contiguous()  # (C, h, w)

    @torch.inference_mode()
    def preview(self, data: bytes, steps: int | None = None, max_bytes: int | None = None,
                max_pixels: int = bs.DEFAULT_MAX_PIXELS) -> "Preview":
        """Decode the first `steps` coding steps of a format version 3 stream (all of them by
        default), reading at most `max_bytes` of it: as many complete steps as fit. `data`
        may be a prefix of the stream (a ranged read); the steps it does not hold are
        predicted by the entropy model (the mixture mean given what was decoded), then g_s
        runs. A preview of all S steps from the whole stream is the full decode, bit for bit
        (latent checksum checked); a partial one has no checksum to check."""
        self._check_codable()
        if steps is not None and not 0 <= steps:
            raise ValueError(f"steps must be >= 0, got {steps}")
        if max_bytes is not None:
            if max_bytes < 0:
                raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
            data = bytes(data[:max_bytes])
        header, payload = bs.unpack(data, max_pixels, prefix=True)
        if not header.progressive:
            raise bs.BitstreamError(
                f"previews need format version 3 (this stream is version {header.version}): decode it in "
                "full, or re-encode it")
        self.check_header(header)
        S = self.cfg.num_steps
        held = header.steps_in(len(data))
        want = S if steps is None else min(steps, S)
        k = min(want, held)
        if k == S and len(payload) == header.payload_len:
            _, y = self.decode_latent(data, max_pixels)
        else:
            _, y = self._decode_latent_portable(header, payload, k)  # k < S: the filled latent
        image = self.synthesis(y, header.height, header.width)
        return Preview(image=image, y=y, steps=k, num_steps=S,
                       bytes_read=header.step_ends[k - 1] if k else header.size,
                       total_bytes=header.step_ends[-1])

    def _decode_latent_v1(self, header: bs.Header, payload: bytes, h: int, w: int) -> torch.Tensor:
        try:
            decoder = SymbolDecoder(payload)
        except Exception as exc:  # constriction rejects malformed word streams
            raise bs.BitstreamError(f"corrupt payload: {exc}") from None

        def decode_step(ids, params, valid, group):
            flat = self._flat_params(params, valid)
            try:
                symbols = decoder.decode(snap_params(flat.means, flat.log_scales, flat.logits))
            except Exception as exc:
                raise bs.BitstreamError(f"entropy decoding failed: {exc}. {V1_PORTABILITY}") from None
            values = torch.zeros(valid.shape + (self.cfg.C,), device=self.device)
            values[valid] = torch.from_numpy(symbols.astype(np.float32)).to(self.device).view(-1, self.cfg.C)
            return values

        use_cache = not header.flags & bs.FLAG_UNCACHED
        with deterministic_kernels(self.device):
            y_hat = self._code_latent_v1((self.cfg.C, h, w), header.window_batch, decode_step, use_cache)
        y_int = y_hat.to(torch.int32).cpu()
        if latent_checksum(y_int) != header.latent_crc:
            raise bs.ChecksumMismatchError(
                "decoded latent does not match the encoder's checksum: the decoder's numerics differ "
                "from the encoder's or the stream is corrupt"
                + (" (this bitstream was encoded on a CUDA device)" if header.flags & bs.FLAG_CUDA else "")
                + f". {V1_PORTABILITY}"
            )
        return y_hat

    @torch.inference_mode()
    def decompress(self, data: bytes, max_pixels: int = bs.DEFAULT_MAX_PIXELS, steps: int | None = None,
                   max_bytes: int | None = None) -> np.ndarray:
        """Decode a bitstream to RGB uint8 (H, W, 3).

        `steps` / `max_bytes` ask for a preview (format version 3, see `preview`). Without
        them a version 3 stream cut exactly at a step boundary decodes as the preview of the
        steps it holds (with a `PartialStreamWarning`); cut anywhere else it is an error."""
        if steps is not None or max_bytes is not None:
            return self.preview(data, steps, max_bytes, max_pixels).image
        header = bs.read_header(data, max_pixels, prefix=True)
        if header.progressive and len(data) < header.step_ends[-1]:
            held = header.steps_in(len(data))
            if held == 0 or header.step_ends[held - 1] != len(data):
                bs.unpack(data, max_pixels)  # raises: truncated
            warnings.warn(PartialStreamWarning(
                f"the stream holds {held} of {self.cfg.num_steps} coding steps ({len(data)} of "
                f"{header.step_ends[-1]} bytes): decoded a preview"), stacklevel=2)
            return self.preview(data, max_pixels=max_pixels).image
        header, y_hat = self.decode_latent(data, max_pixels)
        if header.version == 1:
            with deterministic_kernels(self.device):
                return self.synthesis(y_hat, header.height, header.width, frozen=False)
        return self.synthesis(y_hat, header.height, header.width)

    @torch.inference_mode()
    def decompress_many(self, streams: Sequence[bytes], max_pixels: int = bs.DEFAULT_MAX_PIXELS,
                        batch: int | None = None) -> list:
        """decompress() of many whole streams, batched on the device: the entropy model over
        the windows of many images per step (`decode_latents`), then g_s `batch` latents at a
        time (`synthesis_batch`). Returns, per stream in order, RGB uint8 (H, W, 3) or the
        exception decompress would raise for it: one bad stream never fails the others.
        Latents are exactly decompress()'s; pixels equal them where g_s runs one image at a
        time (a CPU by default) and may differ in float rounding in a batch. A cut version 3
        stream is an error here (decompress() previews it)."""
        results: list = list(self.decode_latents(streams, max_pixels))
        modern = []  # (n, y_hat, H, W) of format version 2/3 latents: g_s may batch them
        for n, got in enumerate(results):
            if isinstance(got, Exception):
                continue
            header, y_hat = got
            if header.version == 1:
                try:
                    with deterministic_kernels(self.device):
                        results[n] = self.synthesis(y_hat, header.height, header.width, frozen=False)
                except Exception as exc:
                    results[n] = exc
            else:
                modern.append((n, y_hat, header.height, header.width))
        try:
            images = self.synthesis_batch([(y, H, W) for _, y, H, W in modern], batch)
        except Exception:  # e.g. out of memory in a batch: one at a time, each failing alone
            images = []
            for _, y, H, W in modern:
                try:
                    images.append(self.synthesis(y, H, W))
                except Exception as exc:
                    images.append(exc)
        for (n, _, _, _), image in zip(modern, images):
            results[n] = image
        return results

    @torch.inference_mode()
    def reconstruct(self, encoded: EncodedImage) -> np.ndarray:
        """The decoder's output for an encoded image, computed on the encoder side."""
        if bs.read_header(encoded.bitstream, max_pixels=bs.MAX_SIDE ** 2).version == 1:
            with deterministic_kernels(self.device):  # as version 1's decoder runs g_s
                return self.synthesis(encoded.y_hat.float(), encoded.height, encoded.width, frozen=False)
        return self.synthesis(encoded.y_hat.float(), encoded.height, encoded.width)


class PartialStreamWarning(UserWarning):
    """A stream cut at a step boundary was decoded as a preview of the steps it holds."""


@dataclass
class Preview:
    image: np.ndarray  # RGB uint8 (H, W, 3)
    y: torch.Tensor  # (C, h, w) float32: the latent g_s ran on (decoded steps exact, the rest predicted)
    steps: int  # coding steps decoded from the stream (the rest predicted)
    num_steps: int  # S
    bytes_read: int  # stream bytes those steps need, header included
    total_bytes: int  # the whole stream's length


# Version 3: a decoder of steps 1..k reads at most this many words past what the encoder had
# committed after step k (num_words() counts those plus 1-2 sealing words; the range coder's
# state is 2 words), so the prefix that ends there decodes steps 1..k exactly.
STEP_READ_AHEAD_WORDS = 2


# Windows the entropy model takes in one pass (plan_latents, decode_latents); a pass holds
# whole chunks, at least one. On a CPU one chunk: merging images' chunks makes the integer
# attention's score tensors outgrow the caches (4 Kodak images planned in passes of 2 took
# 0.59 s per image, one at a time 0.45 s: bench/codec_speed.py --stages). A GPU needs many
# images' windows at once to be busy.
WINDOWS_PER_PASS = {"cpu": 1, "cuda": 16 * bs.CHUNK_WINDOWS}
# Images per g_a / g_s call (analysis_batch, synthesis_batch): one on a CPU, where a batch is
# slower per image (bench/codec_speed.py); a GPU needs many.
TRANSFORM_BATCH = {"cpu": 1, "cuda": 16}


@dataclass
class CodingPlan:
    """What the device stage (`M2TCodec.plan_latents`) hands to the coding stage (`code_plan`)
    for one image: every symbol with its integer parameters, on the CPU. Coding it needs no
    model and no device, so it can run on other threads while the device plans the next images."""

    model_id: str
    weights_hash: bytes
    height: int
    width: int
    y_int: torch.Tensor  # (C, h, w) int32, CPU
    num_windows: int
    steps: list  # per chunk, per step: (symbols (n,) int64 ndarray, IntParams (n, K) int CPU tensors)
    adaptive_order: bool = False
    on_cuda: bool = False


def code_plan(plan: CodingPlan, format_version: int = bs.FORMAT_VERSION) -> EncodedImage:
    """The coding stage: range-code a plan into a format version 2 or 3 bitstream.

    Version 2 codes all chunks into one range coder, chunk after chunk. Version 3 gives each
    chunk its own range coder and notes, after each step, how many words a decoder of that
    step needs (`STEP_READ_AHEAD_WORDS` past what the coder has committed); the payload holds
    those step pieces step-major (`_interleave_steps`), so a prefix of it decodes the first
    steps of every window."""
    if format_version not in (2, 3):
        raise ValueError(f"code_plan writes format version 2 or 3, not {format_version}")
    if plan.adaptive_order and format_version < 3:
        raise ValueError("adaptive_order needs format version 3")
    shared = SymbolEncoder() if format_version == 2 else None
    streams: list[bytes] = []
    marks: list[list[int]] = []
    for chunk_steps in plan.steps:
        encoder = shared or SymbolEncoder()
        chunk_marks: list[int] = []
        for symbols, params in chunk_steps:
            encoder.encode(symbols, snap_integer(params.mean_q, params.level, params.logit_q))
            chunk_marks.append(encoder.num_words())
        if shared is None:
            streams.append(encoder.finish())
            marks.append(chunk_marks)
    min_len = bs.min_payload_len(plan.num_windows)
    pieces: tuple = ()
    if shared is not None:
        payload = shared.finish()
        payload += bytes(max(0, min_len - len(payload)))
    else:
        streams[-1] += bytes(max(0, min_len - sum(map(len, streams))))  # zero words: still valid
        payload, pieces = _interleave_steps(streams, marks)
    header = bs.Header(
        model_id=plan.model_id, weights_hash=plan.weights_hash, height=plan.height, width=plan.width,
        window_batch=0, payload_len=len(payload),
        latent_crc=latent_checksum_v2(plan.y_int, plan.height, plan.width), payload_crc=zlib.crc32(payload),
        version=format_version, step_pieces=pieces,
        flags=(bs.FLAG_CUDA if plan.on_cuda else 0) | (bs.FLAG_ADAPTIVE_ORDER if plan.adaptive_order else 0),
    )
    return EncodedImage(bs.pack(header, payload), plan.y_int, plan.height, plan.width)


class _ChunkError(Exception):
    """A chunk of image `image` failed to decode inside a batched pass."""

    def __init__(self, image: int, error: Exception):
        super().__init__(str(error))
        self.image, self.error = image, error


def _passes(chunks: list, size: Callable, limit: int) -> Iterator[list]:
    """Consecutive runs of whole chunks of at most `limit` windows (at least one chunk each)."""
    i = 0
    while i < len(chunks):
        j, n = i + 1, size(chunks[i])
        while j < len(chunks) and n + size(chunks[j]) <= limit:
            n += size(chunks[j])
            j += 1
        yield chunks[i:j]
        i = j


def _checked_latent(header: bs.Header, y_hat: torch.Tensor) -> torch.Tensor:
    """y_hat (C, h, w) as float, after checking it against the header's latent checksum."""
    if latent_checksum_v2(y_hat.to(torch.int32).cpu(), header.height, header.width) != header.latent_crc:
        raise bs.ChecksumMismatchError(
            "decoded latent or image size does not match the encoder's checksum: the stream is "
            "corrupt (its payload and header checksums were consistent, so it was written wrongly "
            "or tampered with)")
    return y_hat.float()


def _interleave_steps(streams: list[bytes], marks: list[list[int]]) -> tuple[bytes, tuple]:
    """Version 3's payload from each chunk's range-coded stream and the coder's num_words()
    after each step: piece (k, c) = chunk c's words from the end of step k-1's prefix to the
    end of step k's, laid out step-major. Returns (payload, step_pieces in bytes)."""
    W = bs.WORD_BYTES
    ends = []
    for stream, chunk_marks in zip(streams, marks):
        words, prev, chunk_ends = len(stream) // W, 0, []
        for k, mark in enumerate(chunk_marks):
            end = words if k == len(chunk_marks) - 1 else min(words, max(prev, mark + STEP_READ_AHEAD_WORDS))
            chunk_ends.append(end)
            prev = end
        ends.append(chunk_ends)
    num_steps = len(marks[0])
    pieces, parts = [], []
    for k in range(num_steps):
        row = []
        for c, stream in enumerate(streams):
            lo, hi = (ends[c][k - 1] if k else 0) * W, ends[c][k] * W
            parts.append(stream[lo:hi])
            row.append(hi - lo)
        pieces.append(tuple(row))
    return b"".join(parts), tuple(pieces)


def _chunk_streams(header: bs.Header, payload: bytes, steps: int) -> list[bytes]:
    """Version 3: each chunk's range-coded stream, from the pieces of its first `steps` steps
    (which `payload`, possibly a prefix, must hold), zero-padded for the decoder's read-ahead."""
    out = [bytearray() for _ in range(header.num_chunks)]
    pos = 0
    for k, row in enumerate(header.step_pieces[:steps]):
        for c, size in enumerate(row):
            if pos + size > len(payload):
                raise bs.BitstreamError(f"truncated payload: step {k + 1} is not complete")
            out[c] += payload[pos:pos + size]
            pos += size
    pad = bytes(bs.WORD_BYTES * STEP_READ_AHEAD_WORDS) if steps < header.num_steps else b""
    return [bytes(s) + pad for s in out]


def _latent_size(header: bs.Header) -> tuple[int, int]:
    return math.ceil(header.height / bs.DOWNSAMPLING), math.ceil(header.width / bs.DOWNSAMPLING)


def _confident_positions(params: X.IntParams, masked: torch.Tensor, valid: torch.Tensor,
                         rank: torch.Tensor, count: int) -> torch.Tensor:
    """MaskGIT's confidence order for MT: the `count` masked positions (b, count) whose
    predicted distributions have the lowest entropy, measured as the scale level (a log
    scale) of each channel's dominant component summed over channels; padding positions
    after real ones; ties broken by the schedule's order (`rank`). Integers only: encoder
    and decoder choose the same positions on any device."""
    K = params.logit_q.shape[-1]
    top = params.logit_q == params.logit_q.max(dim=-1, keepdim=True).values  # (b, L, C, K)
    first = torch.where(top, torch.arange(K, device=top.device), K).min(dim=-1, keepdim=True).values
    spread = params.level.gather(-1, first)[..., 0].to(torch.int64).sum(-1)  # (b, L) < 2^20
    key = (spread + (~valid).to(torch.int64) * (1 << 24)) * rank.numel() + rank[None]
    key = key.masked_fill(~masked, 1 << 60)  # already coded: never chosen again
    return torch.sort(key, dim=1, stable=True).indices[:, :count]


V1_PORTABILITY = (
    "Format version 1 streams (written before 0.2) come from a float entropy model and decode "
    "only on the kind of machine (CPU instruction set or GPU, torch build) that wrote them: decode "
    "there, or re-encode the source image to get a portable format version 2 stream")


# Windows per teacher-forced call: a memory bound only (the integers do not depend on it).
TEACHER_FORCED_WINDOWS = 16


def _teacher_forced(ops, windows: torch.Tensor) -> X.IntParams:
    """M2T's teacher-forced parameters of `windows` (b, L, C), TEACHER_FORCED_WINDOWS per
    call, kept as int32 (b, L, C, K)."""
    parts = [X.m2t_teacher_forced(ops, windows[s:s + TEACHER_FORCED_WINDOWS])
             for s in range(0, windows.shape[0], TEACHER_FORCED_WINDOWS)]
    return X.IntParams(*(torch.cat([getattr(p, f).to(torch.int32) for p in parts])
                         for f in ("mean_q", "level", "logit_q")))


def numerics_environment(device: torch.device | str = "cpu", transforms: str | None = None) -> dict:
    """What decides g_a's and g_s's float results (not the entropy model's: that is exact):
    two decoders with the same environment give the same pixels; others may differ in the
    last bit of a few pixels. `transforms`: how g_a/g_s run (M2TCodec.numerics() fills it)."""
    device = torch.device(device)
    if transforms is None:
        frozen = device.type == "cpu" and CPU_TRANSFORMS == "frozen" and "g_s" in FROZEN_TRANSFORMS
        transforms = "frozen" if frozen else "eager"  # g_s's: it decides the pixels
    env = {"device": device.type, "torch": torch.__version__, "transforms": transforms}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        env["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        env["threads"] = torch.get_num_threads()
        from .sysinfo import cpu_model

        env["cpu"] = cpu_model()
    return env


def _valid_tokens(latent_hw, window: int, device) -> torch.Tensor:
    """(nW, L) bool: the latent positions of each window that exist (not padding)."""
    h, w = latent_hw
    return to_windows(pad_latent(torch.ones(1, 1, h, w, device=device), window), window)[..., 0] > 0


def _changes(t: torch.Tensor, bits: bool = False) -> int:
    """How often `t` was changed in place (its version counter). Inference tensors (a model
    built or copied under inference_mode) keep none: 0, or with `bits` their _bit_sum."""
    if t.is_inference():
        return _bit_sum(t) if bits else 0
    return t._version


def _bit_sum(t: torch.Tensor) -> int:
    """Sum of a tensor's bytes read as little-endian words: changes with any single value."""
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()  # any dtype, bf16 too
    if raw.size % 4 == 0:
        return int(raw.view(np.uint32).sum(dtype=np.uint64))
    return int(raw.sum(dtype=np.uint64))


def latent_checksum(y_int: torch.Tensor) -> int:
    """Format version 1: CRC-32 of y_hat (int32, C x h x w, C order)."""
    return zlib.crc32(np.ascontiguousarray(y_int.numpy(), dtype="<i4").tobytes())


def latent_checksum_v2(y_int: torch.Tensor, height: int, width: int) -> int:
    """Format version 2: CRC-32 of the image size, the latent shape and y_hat (int32,
    C x h x w, C order): a header whose size was edited no longer matches its latent."""
    C, h, w = y_int.shape
    prefix = struct.pack("<5I", height, width, C, h, w)
    return zlib.crc32(np.ascontiguousarray(y_int.numpy(), dtype="<i4").tobytes(), zlib.crc32(prefix))


def _as_batch(images) -> list:
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]
