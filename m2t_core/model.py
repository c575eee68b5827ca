"""The M2T / MT model: transforms, the entropy network's parameters, the exact entropy model.

Contract (as in CompressAI): `forward(x)` returns the reconstruction and likelihoods for
training; `compress(images) -> list[bytes]` and `decompress(bytes) -> uint8 (H, W, 3)`
mirror each other (they run encoder.Encoder and decoder.Decoder, which hold the coding).

What codes is the exact entropy model (`exact`, integer arithmetic): any batch, thread
count or device gives the same integers, so a stream decodes anywhere. It is exported from
the float parameters (`entropy_model`) whenever those change (training), or the float
parameters are rebuilt from it (a shipped checkpoint holds only the integers). Likewise g_s
decodes in exact integer arithmetic (`g_s_int`, int_synthesis.py), exported from the float
g_s that trains: decoded pixels are a pure function of the stream, the same on every machine.
g_a stays float: the latent is whatever g_a produced, and the stream carries it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import sys
import threading
import warnings
from typing import Sequence

import numpy as np
import torch
from torch import nn

from . import bitstream as bs
from . import coding, cpu_kernels
from . import exact as X
from . import int_synthesis as IS
from . import network as N
from . import rate as R
from .config import ModelConfig
from .entropy_coding import MAX_ABS_SYMBOL
from .image_io import ImageLike
from .transforms import (CPU_TRANSFORMS, FROZEN_TRANSFORMS, AnalysisTransform, SynthesisTransform, bf16_analysis,
                         frozen_for_inference)

UNTRAINED_MODEL_ID = "untrained"


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity gradient in the backward pass."""
    return x + (torch.round(x) - x).detach()


class M2TCodec(nn.Module):
    def __init__(self, cfg: ModelConfig, model_id: str = UNTRAINED_MODEL_ID, *, export: bool = True):
        """export=False leaves the integer models' buffers at zero for the caller to fill (a
        checkpoint being loaded: registry.load_checkpoint), which saves a process's first
        load about 0.08 s of exporting integers that are overwritten."""
        super().__init__()
        self.cfg, self.model_id = cfg, model_id
        self.g_a = AnalysisTransform(cfg.N, cfg.C, cfg.blocks_per_stage, cfg.attention_blocks)
        self.g_s = SynthesisTransform(cfg.N, cfg.C, cfg.blocks_per_stage, cfg.attention_blocks)
        self.entropy_model = N.EntropyParameters(cfg)
        self.layout = N.SlotLayout(cfg)
        # The exact (integer) entropy model that codes, kept in sync with entropy_model (sync_exact).
        self.exact = X.ExactEntropyModel(cfg, self.layout)
        # The integer synthesis transform that decodes, kept in sync with g_s (sync_exact).
        self.g_s_int = IS.IntSynthesis(self.g_s)
        if export:
            self.exact.init_exponents(self.entropy_model)
            self.exact.export_from(self.entropy_model)
            self.g_s_int.export_from(self.g_s)
        self.qat = False  # training: quantisation-aware forward through the exact model's grid
        self.rd_lambda: float | None = None  # the lambda it was trained for (checkpoint info): refine.py
        self._digest_cache: tuple[tuple, bytes] | None = None
        self._fixed: dict[int, list] = {}  # thread id -> [depth, memo] inside weights_fixed()
        self._exact_source = self._entropy_fingerprint()
        self._synthesis_source = self._synthesis_fingerprint()
        self._frozen: dict[str, tuple] = {}  # CPU inference forms of g_a (transforms.FROZEN_TRANSFORMS)
        self._v2: tuple | None = None  # (its sources' fingerprint, the integer-v2 g_s): int_synthesis
        self._exact8: tuple | None = None  # (its sources' fingerprint, the 8-bit entropy model): exact_model
        # A decode-only checkpoint's stored digests per format and the fingerprint of what
        # decoding uses when it was loaded (set_decode_only); None for a whole model.
        self._decode_only: tuple[dict[int, bytes], tuple] | None = None

    def __getstate__(self):
        """Copies and pickles leave the frozen TorchScript forms of the transforms behind
        (TorchScript modules do not pickle), and any fingerprints of a weights_fixed() block;
        they are rebuilt on first use."""
        state = dict(self.__dict__)
        state["_frozen"], state["_fixed"] = {}, {}
        return state

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ------------------------------------------------------------------ rate

    @property
    def rate_levels(self) -> int:
        """K, the trained rate levels of a variable-rate model (rate.py); 0 for a fixed-rate one."""
        return len(self.cfg.rate_lambdas)

    @property
    def default_quality(self) -> float | None:
        """The quality a variable-rate model codes at when none is given: its middle level."""
        return float((self.rate_levels - 1) // 2 + 1) if self.rate_levels else None

    def quality_code(self, quality: float | None = None) -> int | None:
        """A quality for this model -> its 16-bit code (rate.quality_code), None for a fixed-rate
        model; QualityError for a quality out of range or given to a fixed-rate model."""
        if not self.rate_levels:
            if quality is not None:
                raise R.QualityError(f"model {self.model_id!r} has one rate and takes no quality "
                                     "(a variable-rate model does; or choose the model of another rate)")
            return None
        return R.quality_code(self.default_quality if quality is None else quality, self.rate_levels)

    def exact_rate(self, codes) -> "R.ExactRate | None":
        """The exact entropy model's rate of windows with quality codes (b,) (None: fixed rate)."""
        if not self.rate_levels:
            return None
        return R.ExactRate.of(self.exact, codes)

    def float_rate(self, quality: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The float (training) log2 gains (n, C) and rate embeddings (n, D) at qualities (n,)."""
        return (R.interpolate_float(self.entropy_model.log2_gain, quality),
                R.interpolate_float(self.entropy_model.rate_embed, quality))

    def _log2_gains(self, code: int | None) -> torch.Tensor | None:
        """The exact log2 gains (C,) int64 of a quality code (None: fixed rate)."""
        if code is None:
            return None
        self.sync_exact()
        return R.interpolate(self.exact.rate_log2_gain, torch.tensor([code]))[0]

    # ------------------------------------------------------------------ training

    def forward(self, x: torch.Tensor, mt_mask_range: tuple[float, float] = (0.05, 0.99),
                quality: torch.Tensor | None = None) -> dict:
        """x (B, 3, H, W) in [0, 1], H and W multiples of 16; a variable-rate model's `quality`
        (B,) float in [1, K] per image (rate.py: the latent is scaled by its gains).

        Returns x_hat (B, 3, H, W), likelihoods {"y": (B, C, h, w)} and rate_mask
        (B, 1, h, w) bool: the latent positions whose rate counts (all of them for M2T;
        the masked ones for MT). In training mode the likelihood is of y + U(-1/2, 1/2);
        in eval mode, of round(y). The transformer's context is round(y) (straight-through).
        With `qat` the entropy network runs on the exact model's integer grid.
        """
        if x.shape[-1] % bs.DOWNSAMPLING or x.shape[-2] % bs.DOWNSAMPLING:
            raise ValueError(f"forward needs H and W multiples of 16, got {tuple(x.shape[-2:])}")
        self.require_analysis()
        w = self.cfg.window
        y = self.g_a(x)
        rate, inverse = None, None
        if self.rate_levels:
            if quality is None or quality.shape != (x.shape[0],):
                raise ValueError("a variable-rate model's forward needs a quality per image, (B,)")
            v, embed = self.float_rate(quality.to(x.device))  # (B, C), (B, D)
            y = y * torch.exp2(v)[:, :, None, None].to(y.dtype)
            inverse = torch.exp2(-v)[:, :, None, None]
            n_w = math.ceil(y.shape[-2] / w) * math.ceil(y.shape[-1] / w)  # windows per image
            rate = R.FloatRate(v.repeat_interleave(n_w, 0), embed.repeat_interleave(n_w, 0))
        elif quality is not None:
            raise ValueError(f"model {self.model_id!r} has one rate and takes no quality")
        y_hat = ste_round(y)
        y32 = y.float()
        y_rate = y32 + torch.empty_like(y32).uniform_(-0.5, 0.5) if self.training else torch.round(y32)
        B, C, h, wd = y.shape
        valid = coding.pad_latent(torch.ones(B, 1, h, wd, device=x.device), w)
        ctx = coding.to_windows(coding.pad_latent(y_hat, w), w)  # (B*nW, L, C)
        target = coding.to_windows(coding.pad_latent(y_rate, w), w)  # (B*nW, L, C)
        H2, W2 = valid.shape[-2:]
        ops = N.FloatOps(self.entropy_model, self.cfg, self.layout, self.exact, quant=self.qat, rate=rate)
        if self.qat:
            ctx = ctx.float()
        if self.cfg.mode == "m2t":
            params = N.m2t_teacher_forced(ops, ctx)
            rate_mask = valid
        else:
            masked = self._random_mt_mask(ctx.shape[0], mt_mask_range, x.device)  # (B*nW, L)
            params = N.mt_forward(ops, ctx, masked)
            rate_mask = valid * coding.from_windows(masked[..., None].float(), B, H2, W2, w)
        # The rate in fp32 even under autocast: bf16 would round y - mean at |y| > ~32.
        with torch.autocast(x.device.type, enabled=False):
            params32 = N.MixtureParams(*(t.float() for t in (params.means, params.log_scales, params.logits)))
            lik = N.mixture_likelihood(target.float(), params32)  # (B*nW, L, C)
        lik = coding.from_windows(lik, B, H2, W2, w)[..., :h, :wd]  # (B, C, h, w)
        return {
            "x_hat": self.g_s(y_hat if inverse is None else y_hat * inverse.to(y_hat.dtype)),
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

    def _hashed_state(self, version: int = bs.FORMAT_VERSION) -> dict[str, torch.Tensor]:
        """The tensors that decide the numbers of a bitstream: the transforms, the exact
        model's integers and the integer g_s of the stream's format (4: integer-v1, 5:
        integer-v2; the float entropy parameters only feed those). Format 3 streams name the
        model without the integer g_s."""
        names = ("g_a", "g_s", "exact") + (("g_s_int",) if version == 4 else ())
        state = {}
        for name in names:  # the submodules' state dicts: the model's, without the parts not hashed
            state.update(getattr(self, name).state_dict(prefix=f"{name}."))
        if version >= 5:  # the integer-v2 g_s, derived (never stored): named for what it decodes
            state.update({f"g_s_int_v2.{k}": v for k, v in self.int_synthesis(version).state_dict().items()})
        if bs.eight_bit_entropy(version):  # and the 8-bit entropy model, derived likewise
            state.update({f"exact_8bit.{k}": v for k, v in self.exact_model(version).state_dict().items()})
        return state

    def weights_digest(self, version: int | None = None) -> bytes:
        """SHA-256 over the config and the tensors of `_hashed_state` (names, shapes, float32
        bytes for float tensors, little-endian int64 bytes for integer ones): the model's
        identity, written (its first 8 bytes) into every bitstream of format `version`
        (default: the one this model writes, write_version())."""
        version = self.write_version() if version is None else version
        self.sync_exact()  # the integers follow the float weights (training, edits)
        return self._once_per_block(("digest", version), lambda: self._digest(version))

    def _digest(self, version: int) -> bytes:
        state = self._hashed_state(version)
        # A cheap fingerprint decides whether the SHA-256 must be recomputed. Storage address
        # and version counter miss edits through `.data` and dtype round trips, so an exact
        # integer sum of every tensor's bits is part of it too (~5 ms for 4M parameters).
        fingerprint = tuple(
            (k, t.dtype, tuple(t.shape), t.data_ptr(), _changes(t), _bit_sum(t)) for k, t in state.items()
        )
        if self._digest_cache is not None and self._digest_cache[0] == (version, fingerprint):
            return self._digest_cache[1]
        if self._decode_only is not None:
            digest = self._stored_digest(version)
            self._digest_cache = ((version, fingerprint), digest)
            return digest
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
        self._digest_cache = ((version, fingerprint), digest)
        return digest

    # ------------------------------------------------------------------ decode-only checkpoints

    @property
    def decode_only(self) -> bool:
        """Whether this model came from a decode-only checkpoint (registry.write_decode_only:
        replaced weights kept for their streams, without g_a): it decodes, never encodes."""
        return self._decode_only is not None

    def set_decode_only(self, digests: dict[int, bytes]) -> None:
        """Mark this model decode-only (registry.load_checkpoint): g_a was not stored, so its
        digests per format version are the ones computed from the whole model when the file
        was written, valid while what decoding uses stays as loaded."""
        self._decode_only = (dict(digests), self._decoding_fingerprint())
        self._digest_cache = None

    def _decoding_fingerprint(self) -> tuple:
        """The contents (not the storage: the model may move between devices) of everything a
        digest covers but g_a."""
        return tuple((k, t.dtype, tuple(t.shape), _bit_sum(t)) for name in ("g_s", "exact", "g_s_int")
                     for k, t in getattr(self, name).state_dict(prefix=f"{name}.").items())

    def _stored_digest(self, version: int) -> bytes:
        digests, loaded = self._decode_only
        if self._decoding_fingerprint() != loaded:
            raise ValueError(f"model {self.model_id!r} is a decode-only checkpoint whose weights were changed after "
                             "loading: its weights hash is unknown (reload it)")
        if version not in digests:  # a format newer than the file: these weights never wrote it
            raise bs.ModelMismatchError(f"model {self.model_id!r} is a decode-only checkpoint that recorded no "
                                        f"weights hash for format {version} (its weights were replaced before "
                                        "that format was written)")
        return digests[version]

    def require_analysis(self) -> None:
        """ValueError where g_a is not this model's own (a decode-only checkpoint)."""
        if self._decode_only is not None:
            raise ValueError(f"model {self.model_id!r} is decode-only (replaced weights kept so that the streams "
                             "they wrote still decode; the file holds no analysis transform): it cannot encode; "
                             "encode with the installed model of that name")

    def weights_hash(self, version: int | None = None) -> bytes:
        """The first 8 bytes of weights_digest: what a stream of format `version` names
        (default: the format this model writes)."""
        return self.weights_digest(version)[:8]

    def weights_hashes(self) -> dict[int, bytes]:
        """weights_hash of every readable format this model knows (a decode-only file: those it recorded)."""
        known = {version: self.known_weights_hash(version) for version in bs.READABLE_VERSIONS}
        return {version: h for version, h in known.items() if h is not None}

    def known_weights_hash(self, version: int) -> bytes | None:
        """weights_hash(version), or None where this model does not know it (a decode-only
        checkpoint whose file is older than the format)."""
        try:
            return self.weights_hash(version)
        except bs.ModelMismatchError:
            return None

    def wrote(self, header: bs.Header) -> bool:
        """Whether these weights wrote the stream of `header`: its model name, and the weights
        hash of the stream's format."""
        return header.model_id == self.model_id and self.known_weights_hash(header.version) == header.weights_hash

    def check_header(self, header: bs.Header) -> None:
        """ModelMismatchError unless this model wrote the stream (name and weights hash);
        BitstreamError unless its quality fits the model (variable-rate models write format 6
        with a quality in their range, fixed-rate ones other formats, without)."""
        if not self.wrote(header):
            known = self.known_weights_hash(header.version)
            raise bs.ModelMismatchError(
                f"bitstream was written by model {header.model_id!r} (weights {header.weights_hash.hex()}), "
                f"not by {self.model_id!r} (weights {known.hex() if known else 'of another format'})")
        if (header.quality is None) == bool(self.rate_levels):
            raise bs.BitstreamError(
                f"corrupt header: format {header.version} for the {'variable' if self.rate_levels else 'fixed'}"
                f"-rate model {self.model_id!r}")
        if header.quality is not None:
            try:
                R.check_code(header.quality, self.rate_levels)
            except R.QualityError as exc:
                raise bs.BitstreamError(f"corrupt header: {exc}") from None

    def write_version(self, format_version: int | None = None) -> int:
        """The format this model writes: format 6 for a variable-rate model (it alone holds the
        quality), else `format_version` (default bitstream.FORMAT_VERSION)."""
        if self.rate_levels:
            if format_version not in (None, bs.QUALITY_VERSION):
                raise ValueError(f"a variable-rate model writes format {bs.QUALITY_VERSION} only, not {format_version}")
            return bs.QUALITY_VERSION
        version = bs.FORMAT_VERSION if format_version is None else format_version
        if version not in bs.WRITABLE_VERSIONS or bs.has_quality(version):
            writable = [v for v in bs.WRITABLE_VERSIONS if not bs.has_quality(v)]
            raise ValueError(f"format_version must be one of {writable} for a fixed-rate model, got {version!r}")
        return version

    def check_codable(self) -> None:
        if self.training:
            raise RuntimeError("call model.eval() before coding")

    # ------------------------------------------------------------------ the exact model

    @contextlib.contextmanager
    def weights_fixed(self):
        """A block of this thread in which the weights do not change (one coding call: the
        decoder's and the encoder's entry points): the fingerprints that sync_exact compares
        and the digest (each a sum over weights' bits, ~25 ms per image in all) are found once
        in it instead of at every check. Nested blocks share the outermost's."""
        me = threading.get_ident()
        entry = self._fixed.setdefault(me, [0, {}])
        entry[0] += 1
        try:
            yield
        finally:
            entry[0] -= 1
            if entry[0] == 0:
                del self._fixed[me]

    def _forget_fingerprints(self) -> None:
        """Weights are being changed on purpose (calibration, loading): no block's results hold."""
        entry = self._fixed.get(threading.get_ident())
        if entry is not None:
            entry[1].clear()

    def _once_per_block(self, key, compute):
        """compute(); inside a weights_fixed() block of this thread, its first result there."""
        entry = self._fixed.get(threading.get_ident())
        if entry is None:
            return compute()
        if key not in entry[1]:
            entry[1][key] = compute()
        return entry[1][key]

    def _entropy_fingerprint(self) -> tuple:
        return self._once_per_block("entropy", lambda: tuple(
            (k, t.data_ptr(), _changes(t), _bit_sum(t)) for k, t in self.entropy_model.state_dict().items()))

    def _synthesis_fingerprint(self) -> tuple:
        return self._once_per_block("synthesis", lambda: tuple(
            (k, t.data_ptr(), _changes(t), _bit_sum(t)) for k, t in self.g_s.state_dict().items()))

    def sync_exact(self) -> None:
        """Re-export the exact entropy model and the integer g_s if their float weights changed
        since (training), with the exponents they have. Deterministic: elementwise rounding."""
        fingerprint = self._entropy_fingerprint()
        if fingerprint != self._exact_source:
            self.exact.export_from(self.entropy_model)
            self._exact_source = fingerprint
        fingerprint = self._synthesis_fingerprint()
        if fingerprint != self._synthesis_source:
            self.g_s_int.export_from(self.g_s)
            self._synthesis_source = fingerprint

    def int_synthesis(self, version: int = bs.FORMAT_VERSION) -> IS.IntSynthesis:
        """The integer g_s that decodes streams of format `version`: `g_s_int` (integer-v1)
        for formats 3 and 4; for format 5 its integer-v2 form (8-bit weights), derived from
        the float g_s and g_s_int's exponents on first use and again whenever those change."""
        self.sync_exact()
        if version < 5:
            return self.g_s_int
        v1 = self.g_s_int
        sources = self._once_per_block("integer-v2", lambda: (
            self._synthesis_source, _bit_sum(v1.act_exp),
            tuple(_bit_sum(t) for t in v1.conv(v1.pixel_conv).state_dict().values())))
        if self._v2 is None or self._v2[0] != sources:
            # Derived outside inference mode (synthesis runs under it): inference tensors keep
            # no version counter, and IntConv caches nothing for them, so every decode would
            # prepack its int8 weights and rescaling terms again (~8 % of a Kodak decode).
            with torch.inference_mode(False):
                v2 = v1.eight_bit(self.g_s)
            self._v2 = (sources, v2.to(v1.act_exp.device))
        return self._v2[1]

    def exact_model(self, version: int = bs.FORMAT_VERSION) -> X.ExactEntropyModel:
        """The exact entropy model that codes streams of format `version`: `exact` (16-bit
        weights), or for format 7 its 8-bit form (X.eight_bit_weights), derived from `exact`
        on first use and again whenever its integers change."""
        self.sync_exact()
        if not bs.eight_bit_entropy(version):
            return self.exact
        # exact's tensors by storage and version counter: no pass over its integers per call
        sources = self._once_per_block("exact-8bit", lambda: tuple(
            (k, t.device, t.data_ptr(), _changes(t, bits=True)) for k, t in self.exact.state_dict().items()))
        if self._exact8 is None or self._exact8[0] != sources:
            # Derived outside inference mode, as the integer-v2 g_s: tensors with version
            # counters, so each linear's int8 route is prepacked once, not at every call.
            with torch.inference_mode(False):
                self._exact8 = (sources, X.eight_bit_weights(self.exact))
        return self._exact8[1]

    def mark_exact_synced(self) -> None:
        """The float weights and the integer models were just set consistently (a checkpoint)."""
        self._forget_fingerprints()
        self._exact_source = self._entropy_fingerprint()
        self._synthesis_source = self._synthesis_fingerprint()

    @torch.no_grad()
    def calibrate_synthesis(self, latents: Sequence[torch.Tensor]) -> dict[str, float]:
        """Choose the integer g_s's activation exponents from latents y_hat (B, C, h, w) of
        training images, and export. Returns the observed activation maxima."""
        was_training = self.g_s.training
        self.g_s.eval()
        try:
            observed = self.g_s_int.calibrate(self.g_s, [y.to(self.device) for y in latents])
        finally:
            self.g_s.train(was_training)
        self._forget_fingerprints()
        self._synthesis_source = self._synthesis_fingerprint()
        return observed

    @torch.no_grad()
    def calibrate_exact(self, tokens: torch.Tensor, quality: torch.Tensor | None = None) -> dict[str, float]:
        """Choose the exact model's exponents from latent windows `tokens` (B, L, C) of
        training images (a variable-rate model's at their windows' float qualities (B,)), and
        export. Returns the observed activation maxima."""
        rate = None
        if self.rate_levels:
            rate = R.FloatRate(*self.float_rate(quality))
        observed = self.exact.calibrate(self.entropy_model, tokens, rate=rate)
        self._forget_fingerprints()
        self._exact_source = self._entropy_fingerprint()
        return observed

    # ------------------------------------------------------------------ the transforms, for coding

    @torch.inference_mode()
    def analysis(self, rgb: np.ndarray, quality_code: int | None = None) -> torch.Tensor:
        """RGB uint8 (H, W, 3) -> y_hat (C, h, w) rounded and clamped, float32 (a variable-rate
        model's scaled by the gains of `quality_code`, see quality_code())."""
        return self.quantize(self.latent(rgb), quality_code)

    @torch.inference_mode()
    def latent(self, rgb: np.ndarray) -> torch.Tensor:
        """RGB uint8 (H, W, 3) -> g_a's output y (C, h, w), float, before gains and rounding
        (quantize() makes y_hat of it: an encoder trying several qualities runs g_a once)."""
        from . import tiling  # large images run in overlapping tiles: memory does not grow with them

        self.require_analysis()
        rgb = rgb if rgb.flags.writeable else rgb.copy()  # torch wants writable memory
        x = torch.from_numpy(rgb).to(self.device).permute(2, 0, 1)[None]  # (1, 3, H, W) uint8
        return tiling.analysis(self.g_a, x, run=self._inference_transform("g_a"))

    @torch.inference_mode()
    def quantize(self, y: torch.Tensor, quality_code: int | None = None) -> torch.Tensor:
        """g_a's output (C, h, w) -> y_hat: scaled by a variable-rate model's gains, rounded, clamped."""
        return torch.round(self._gained(y, quality_code)).clamp(-MAX_ABS_SYMBOL, MAX_ABS_SYMBOL)

    def _gained(self, y: torch.Tensor, quality_code: int | None) -> torch.Tensor:
        """g_a's output (..., C, h, w) times a variable-rate model's gains (float: the encoder's
        choice; the stream carries the rounded result)."""
        self.check_quality_code(quality_code)
        if quality_code is None:
            return y
        gain = R.gain_float(self._log2_gains(quality_code)).to(y.device, y.dtype)  # (C,)
        return y * gain[:, None, None]

    def check_quality_code(self, quality_code: int | None) -> None:
        """QualityError unless `quality_code` fits this model: a code in range for a variable-rate
        model, None for a fixed-rate one."""
        if (quality_code is None) != (not self.rate_levels):
            raise R.QualityError(f"model {self.model_id!r} is variable-rate: it needs a quality" if self.rate_levels
                                 else f"model {self.model_id!r} has one rate and takes no quality")
        if quality_code is not None:
            R.check_code(quality_code, self.rate_levels)

    @torch.inference_mode()
    def synthesis(self, y_hat: torch.Tensor, height: int, width: int, version: int = bs.FORMAT_VERSION,
                  quality_code: int | None = None) -> np.ndarray:
        """y_hat (C, h, w) -> RGB uint8 (height, width, 3), in the integer g_s of format
        `version` (the stream's: int_synthesis); a variable-rate model's latent is first
        scaled back by the gains of `quality_code`, exactly (rate.scale_pow2)."""
        from . import tiling

        x_hat = tiling.synthesis(self.g_s, y_hat[None].to(self.device, torch.float32).contiguous(), height, width,
                                 run=self._integer_synthesis(version, quality_code))
        return x_hat.permute(1, 2, 0).cpu().numpy()  # (3, height, width) uint8 -> (height, width, 3)

    @torch.inference_mode()
    def analysis_batch(self, rgbs: Sequence[np.ndarray], batch: int = 0,
                       quality_codes: Sequence[int | None] | None = None) -> list[torch.Tensor]:
        """analysis() of many RGB images: images of one size go through g_a `batch` at a time
        (0: coding.TRANSFORM_BATCH of the device: 1 on a CPU, where a batch is no faster;
        many on a GPU). Returns y_hat (C, h, w) per image, in order. A batch may change g_a's
        float rounding and so a few latent values (bench/batch_consistency.py); any latent
        codes and decodes exactly. A variable-rate model's `quality_codes`, one per image."""
        from . import tiling

        self.require_analysis()
        batch = batch or coding.transform_batch(self.device)
        codes = list(quality_codes) if quality_codes is not None else [None] * len(rgbs)
        out: list[torch.Tensor | None] = [None] * len(rgbs)
        run = self._inference_transform("g_a")
        for idx in coding.same_size_runs([rgb.shape[:2] for rgb in rgbs], batch):
            x = torch.from_numpy(np.stack([rgbs[i] for i in idx])).to(self.device).permute(0, 3, 1, 2)  # (B, 3, H, W)
            y = tiling.analysis_batch(self.g_a, x, run=run)
            if y is not None:  # None: a size that runs in tiles, one image at a time
                for k, i in enumerate(idx):
                    out[i] = torch.round(self._gained(y[k], codes[i])).clamp(-MAX_ABS_SYMBOL, MAX_ABS_SYMBOL)
        return [y if y is not None else self.analysis(rgbs[i], codes[i]) for i, y in enumerate(out)]

    @torch.inference_mode()
    def synthesis_batch(self, latents: Sequence[tuple], batch: int = 0,
                        version: int = bs.FORMAT_VERSION) -> list[np.ndarray]:
        """synthesis() of many (y_hat (C, h, w), H, W) of one format `version` (a variable-rate
        model's (y_hat, H, W, quality_code)): latents of one size (and quality) through g_s
        `batch` at a time (0: coding.TRANSFORM_BATCH of the device). RGB uint8 (H, W, 3) each."""
        from . import tiling

        batch = batch or coding.transform_batch(self.device)
        items = [(item[0], item[1], item[2], item[3] if len(item) > 3 else None) for item in latents]
        out: list[np.ndarray | None] = [None] * len(items)
        for idx in coding.same_size_runs([(tuple(y.shape), H, W, code) for y, H, W, code in items], batch):
            _, H, W, code = items[idx[0]]
            y = torch.stack([items[i][0] for i in idx]).to(self.device, torch.float32)  # (B, C, h, w)
            x_hat = tiling.synthesis_batch(self.g_s, y, H, W, run=self._integer_synthesis(version, code))
            if x_hat is not None:
                x_hat = x_hat.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
                for k, i in enumerate(idx):
                    out[i] = x_hat[k]
        return [x if x is not None else self.synthesis(*items[i][:3], version=version, quality_code=items[i][3])
                for i, x in enumerate(out)]

    def _integer_synthesis(self, version: int, quality_code: int | None = None):
        """The integer g_s of format `version` as a function y_hat (B, C, h, w) -> uint8
        pixels (B, 3, 16h, 16w); a variable-rate model's scales its input back by the exact
        inverse gains of `quality_code`."""
        self.check_quality_code(quality_code)
        g_s_int = self.int_synthesis(version)
        v = self._log2_gains(quality_code)
        inverse = None if v is None else -v[None]  # (1, C) log2 of the inverse gains, in 1/256
        return lambda y: IS.synthesize(g_s_int, y, log2_gain=inverse)

    def transforms_implementation(self) -> str:
        """How g_a runs here ("frozen" on CPUs unless M2T_EAGER_TRANSFORMS=1, else "eager");
        g_s decodes in integers everywhere."""
        if self.device.type != "cpu" or CPU_TRANSFORMS != "frozen":
            return "eager"
        with torch.inference_mode():
            return "frozen" if self._inference_transform("g_a") is not None else "eager"

    def numerics(self, version: int = bs.FORMAT_VERSION) -> dict:
        """What decides the decoded pixels of format `version`: only the stream and the model,
        since g_s is exact integer arithmetic (an archive records this; verify compares pixels
        wherever the decoder has that arithmetic, i.e. on any machine: `portable_numerics`)."""
        return {"synthesis": IS.arithmetic(version)}

    @staticmethod
    def portable_numerics() -> list[dict]:
        """The numerics this decoder reproduces on any machine (every integer g_s it has)."""
        return [{"synthesis": name} for name in (IS.ARITHMETIC_V1, IS.ARITHMETIC_V2)]

    def _inference_transform(self, name: str):
        """The frozen CPU form of g_a (or of any transform in FROZEN_TRANSFORMS; built on first
        use and again whenever the weights changed), or None to run the module itself."""
        module = getattr(self, name)
        if self.device.type != "cpu" or CPU_TRANSFORMS != "frozen" or name not in FROZEN_TRANSFORMS \
                or torch.is_grad_enabled() or module.training or self._frozen.get("failed"):
            return None
        bf16 = name == "g_a" and bf16_analysis()
        fingerprint = (bf16,) + tuple((t.data_ptr(), _changes(t, bits=True)) for t in module.state_dict().values())
        built = self._frozen.get(name)
        if built is None or built[0] != fingerprint:
            in_channels = 3 if name == "g_a" else self.cfg.C
            try:
                frozen = frozen_for_inference(module, in_channels, bf16)
            except Exception as exc:  # e.g. a torch without TorchScript: the eager modules, said once
                warnings.warn(f"running g_a/g_s eagerly: freezing them for CPU inference failed ({exc})")
                self._frozen["failed"] = (fingerprint, None)
                return None
            built = self._frozen[name] = (fingerprint, frozen)
        return built[1]

    # ------------------------------------------------------------------ coding, the short way

    def compress(self, images: ImageLike | Sequence[ImageLike], max_pixels: int = bs.DEFAULT_MAX_PIXELS,
                 quality: float | None = None, refine_steps: int = 0) -> list[bytes]:
        """One image or a batch -> one bitstream per image (encoder.Encoder; the first image
        that cannot be coded raises); a variable-rate model's at `quality`; refine.py's steps."""
        from .encoder import Encoder

        encoder = Encoder(self, max_pixels=max_pixels, quality=quality, refine_steps=refine_steps)
        return [encoder.encode_image(img).bitstream for img in _as_batch(images)]

    def decompress(self, data: bytes, max_pixels: int = bs.DEFAULT_MAX_PIXELS, steps: int | None = None,
                   max_bytes: int | None = None) -> np.ndarray:
        """A bitstream -> RGB uint8 (H, W, 3) (decoder.Decoder.decompress; `steps` /
        `max_bytes` ask for a preview from a prefix of the stream)."""
        from .decoder import Decoder

        return Decoder(self, max_pixels=max_pixels).decompress(data, steps=steps, max_bytes=max_bytes)


def numerics_environment(device: torch.device | str = "cpu", transforms: str | None = None) -> dict:
    """What decides float transforms' results: g_a's here (the latent it rounds), and the
    pixels of m2t 0.3's float g_s, which archives of 0.3 recorded (verify compares their
    pixels only under the same environment). `transforms`: how they ran."""
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


def weights_fixed(method):
    """A coder's method (Encoder, Decoder: self.model) run in self.model.weights_fixed()."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with self.model.weights_fixed():
            return method(self, *args, **kwargs)
    return run


def _changes(t: torch.Tensor, bits: bool = False) -> int:
    """How often `t` was changed in place (its version counter). Inference tensors (a model
    built or copied under inference_mode) keep none: 0, or with `bits` their _bit_sum."""
    if t.is_inference():
        return _bit_sum(t) if bits else 0
    return t._version


def _bit_sum(t: torch.Tensor) -> int:
    """Sum of a tensor's bytes read as little-endian words (mod 2^64): changes with any single
    value. One C pass where the kernels are built and t is a contiguous CPU tensor (a coding
    call fingerprints ~800 tensors: the numpy form's per-tensor cost was ~8 ms of a decode)."""
    lib = cpu_kernels.library()
    if lib is not None and t.device.type == "cpu" and t.is_contiguous() and sys.byteorder == "little":
        return lib.word_sum(t.data_ptr(), t.numel() * t.element_size())
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()  # any dtype, bf16 too
    if raw.size % 4 == 0:
        return int(raw.view(np.uint32).sum(dtype=np.uint64))
    return int(raw.sum(dtype=np.uint64))


def _as_batch(images) -> list:
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]
