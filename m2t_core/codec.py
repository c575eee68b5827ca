"""The M2T / MT image codec: transforms + transformer entropy model + entropy coding.

Contract (as in CompressAI): `forward(x)` returns the reconstruction and likelihoods for
training; `compress(images) -> list[bytes]` and `decompress(bytes) -> uint8 (H, W, 3)` mirror
each other.

Bit-exactness. The decoder must recompute exactly the distribution parameters the encoder
used. So the encoder never uses the teacher-forced pass to code: it runs the decoder's own
incremental computation (`_code_latent`), call for call, with the same tensor shapes: the
windows of ONE image, in chunks of `window_batch` windows (stored in the header). Nothing
from other images in a batch ever shares a transformer call, so how an image was batched
cannot change its numbers. Parameters are then snapped to integers (entropy_coding.py), and
a CRC of the latent lets the decoder detect any remaining mismatch (e.g. a bitstream
written on a GPU and decoded on a CPU) instead of returning garbage.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import bitstream as bs
from .config import ModelConfig
from .entropy_coding import MAX_ABS_SYMBOL, SymbolDecoder, SymbolEncoder, snap_params
from .image_io import ImageLike, to_rgb_array
from .transformer import DecodeState, EntropyTransformer, MixtureParams, mixture_likelihood
from .transforms import AnalysisTransform, SynthesisTransform

DEFAULT_WINDOW_BATCH = 8
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
        self._digest_cache: tuple[tuple, bytes] | None = None

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
        if self.cfg.mode == "m2t":
            params = self.entropy_model.m2t_forward(ctx)
            rate_mask = valid
        else:
            masked = self._random_mt_mask(ctx.shape[0], mt_mask_range, x.device)  # (B*nW, L)
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

    def weights_digest(self) -> bytes:
        """SHA-256 over the config and every parameter/buffer (names, shapes, float32 bytes)."""
        state = self.state_dict()
        # A cheap fingerprint decides whether the SHA-256 must be recomputed. Storage address
        # and version counter miss edits through `.data` and dtype round trips, so an exact
        # integer sum of every tensor's bits is part of it too (~5 ms for 4M parameters).
        fingerprint = tuple(
            (k, t.dtype, tuple(t.shape), t.data_ptr(), t._version, _bit_sum(t)) for k, t in state.items()
        )
        if self._digest_cache is not None and self._digest_cache[0] == fingerprint:
            return self._digest_cache[1]
        h = hashlib.sha256(json.dumps(self.cfg.to_dict(), sort_keys=True).encode())
        for name in sorted(state):
            t = state[name].detach().to("cpu", torch.float32).contiguous()
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
        digest = h.digest()
        self._digest_cache = (fingerprint, digest)
        return digest

    def weights_hash(self) -> bytes:
        return self.weights_digest()[:8]

    # ------------------------------------------------------------------ coding core

    def _code_latent(self, latent_shape: tuple[int, int, int], window_batch: int,
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
        groups = [torch.as_tensor(g, device=device) for g in self.entropy_model.sched.groups]
        for start in range(0, num_windows, window_batch):
            ids = np.arange(start, min(start + window_batch, num_windows))
            tokens = torch.zeros(len(ids), ww * ww, C, device=device)  # (b, L, C)
            state = DecodeState()
            for group in groups:
                params = self.entropy_model.step(tokens, state, use_cache=use_cache)  # (b, n_i, C, K)
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

    # ------------------------------------------------------------------ compress

    def analysis(self, rgb: np.ndarray) -> torch.Tensor:
        """RGB uint8 (H, W, 3) -> y_hat (C, h, w) rounded and clamped, float32."""
        rgb = rgb if rgb.flags.writeable else rgb.copy()  # torch wants writable memory
        x = torch.from_numpy(rgb).to(self.device).permute(2, 0, 1)[None].float() / 255.0  # (1, 3, H, W)
        pad_b, pad_r = bs.image_padding(rgb.shape[0], rgb.shape[1])
        x = F.pad(x, (0, pad_r, 0, pad_b), mode="replicate")
        y = self.g_a(x)[0]
        return torch.round(y).clamp(-MAX_ABS_SYMBOL, MAX_ABS_SYMBOL)

    def synthesis(self, y_hat: torch.Tensor, height: int, width: int) -> np.ndarray:
        """y_hat (C, h, w) -> RGB uint8 (height, width, 3)."""
        x_hat = self.g_s(y_hat[None].to(self.device, torch.float32).contiguous())[0, :, :height, :width]
        x_hat = torch.round(x_hat.clamp(0.0, 1.0) * 255.0).to(torch.uint8)
        return x_hat.permute(1, 2, 0).cpu().numpy()

    @torch.inference_mode()
    def encode_image(self, image: ImageLike, window_batch: int = DEFAULT_WINDOW_BATCH,
                     max_pixels: int = bs.DEFAULT_MAX_PIXELS, use_cache: bool = True) -> EncodedImage:
        self._check_codable()
        rgb = to_rgb_array(image)
        H, W = rgb.shape[:2]
        if H > bs.MAX_SIDE or W > bs.MAX_SIDE or H * W > max_pixels:
            raise bs.ImageTooLargeError(f"image of {H}x{W} pixels exceeds the limit of {max_pixels}")
        if not 1 <= window_batch <= bs.MAX_WINDOW_BATCH:
            raise ValueError(f"window_batch must be in 1..{bs.MAX_WINDOW_BATCH}")
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

            coded = self._code_latent(tuple(y_hat.shape), window_batch, encode_step, use_cache)
        assert torch.equal(coded, y_hat), "internal error: coded latent differs from y_hat"
        payload = encoder.finish()
        y_int = y_hat.to(torch.int32).cpu()
        header = bs.Header(
            model_id=self.model_id, weights_hash=self.weights_hash(), height=H, width=W,
            window_batch=window_batch, payload_len=len(payload),
            latent_crc=latent_checksum(y_int), payload_crc=zlib.crc32(payload),
            flags=(bs.FLAG_CUDA if self.device.type == "cuda" else 0) | (0 if use_cache else bs.FLAG_UNCACHED),
        )
        return EncodedImage(bs.pack(header, payload), y_int, H, W)

    def compress(self, images: ImageLike | Sequence[ImageLike], window_batch: int = DEFAULT_WINDOW_BATCH,
                 max_pixels: int = bs.DEFAULT_MAX_PIXELS) -> list[bytes]:
        """One image or a batch -> one bitstream per image."""
        return [self.encode_image(img, window_batch, max_pixels).bitstream for img in _as_batch(images)]

    # ------------------------------------------------------------------ decompress

    def check_header(self, header: bs.Header) -> None:
        if header.model_id != self.model_id or header.weights_hash != self.weights_hash():
            raise bs.ModelMismatchError(
                f"bitstream was written by model {header.model_id!r} (weights {header.weights_hash.hex()}), "
                f"not by {self.model_id!r} (weights {self.weights_hash().hex()})"
            )

    @torch.inference_mode()
    def decode_latent(self, data: bytes, max_pixels: int = bs.DEFAULT_MAX_PIXELS) -> tuple[bs.Header, torch.Tensor]:
        """Entropy-decode y_hat (C, h, w) and verify it against the header's checksum."""
        self._check_codable()
        header, payload = bs.unpack(data, max_pixels)
        self.check_header(header)
        h = math.ceil(header.height / bs.DOWNSAMPLING)
        w = math.ceil(header.width / bs.DOWNSAMPLING)
        try:
            decoder = SymbolDecoder(payload)
        except Exception as exc:  # constriction rejects malformed word streams
            raise bs.BitstreamError(f"corrupt payload: {exc}") from None

        def decode_step(ids, params, valid, group):
            flat = self._flat_params(params, valid)
            try:
                symbols = decoder.decode(snap_params(flat.means, flat.log_scales, flat.logits))
            except Exception as exc:
                raise bs.BitstreamError(f"entropy decoding failed: {exc}") from None
            values = torch.zeros(valid.shape + (self.cfg.C,), device=self.device)
            values[valid] = torch.from_numpy(symbols.astype(np.float32)).to(self.device).view(-1, self.cfg.C)
            return values

        use_cache = not header.flags & bs.FLAG_UNCACHED
        with deterministic_kernels(self.device):
            y_hat = self._code_latent((self.cfg.C, h, w), header.window_batch, decode_step, use_cache)
        y_int = y_hat.to(torch.int32).cpu()
        if latent_checksum(y_int) != header.latent_crc:
            raise bs.ChecksumMismatchError(
                "decoded latent does not match the encoder's checksum: the decoder's numerics differ "
                "from the encoder's (different device kind or library build?) or the stream is corrupt"
                + (" (this bitstream was encoded on a CUDA device)" if header.flags & bs.FLAG_CUDA else "")
            )
        return header, y_hat

    @torch.inference_mode()
    def decompress(self, data: bytes, max_pixels: int = bs.DEFAULT_MAX_PIXELS) -> np.ndarray:
        header, y_hat = self.decode_latent(data, max_pixels)
        with deterministic_kernels(self.device):
            return self.synthesis(y_hat, header.height, header.width)

    @torch.inference_mode()
    def reconstruct(self, encoded: EncodedImage) -> np.ndarray:
        """The decoder's output for an encoded image, computed on the encoder side."""
        with deterministic_kernels(self.device):
            return self.synthesis(encoded.y_hat.float(), encoded.height, encoded.width)


def _bit_sum(t: torch.Tensor) -> int:
    """Sum of a tensor's bytes read as little-endian words: changes with any single value."""
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()  # any dtype, bf16 too
    if raw.size % 4 == 0:
        return int(raw.view(np.uint32).sum(dtype=np.uint64))
    return int(raw.sum(dtype=np.uint64))


def latent_checksum(y_int: torch.Tensor) -> int:
    return zlib.crc32(np.ascontiguousarray(y_int.numpy(), dtype="<i4").tobytes())


def _as_batch(images) -> list:
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]
