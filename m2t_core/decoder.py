"""The decoder: bitstreams -> latents -> pixels, whole or as previews from stream prefixes.

    rgb = Decoder(model).decompress(stream)
    images = Decoder(model, batch_images=16).decompress_many(streams)   # errors in place
    preview = Decoder(model).preview(stream_prefix, steps=4)

Latents are exact (the entropy model is integer arithmetic): every decoder of a stream gets
the encoder's latent, checked against the header's latent checksum. Pixels come from the
integer g_s (int_synthesis.py): the encoder's reconstruction, bit for bit, on any machine,
thread count, batch or tiling.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from . import bitstream as bs
from . import coding
from . import exact as X
from .entropy_coding import MAX_ABS_SYMBOL, MEAN_STEPS, SymbolDecoder, mixture_mean_q, snap_integer
from .model import M2TCodec, weights_fixed


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


class _ChunkError(Exception):
    """A chunk of image `image` failed to decode inside a batched pass."""

    def __init__(self, image: int, error: Exception):
        super().__init__(str(error))
        self.image, self.error = image, error


class Decoder:
    """Decodes the streams `model` wrote (in eval mode).

    batch_images: streams whose windows share each entropy-model pass and images per g_s
      call in decompress_many (0: the device's default, coding.TRANSFORM_BATCH);
    max_pixels: larger images are refused from their header, before any work;
    windows_per_pass: entropy-model windows per pass (0: coding.WINDOWS_PER_PASS)."""

    def __init__(self, model: M2TCodec, *, batch_images: int = 0, max_pixels: int = bs.DEFAULT_MAX_PIXELS,
                 windows_per_pass: int = 0):
        if batch_images < 0 or windows_per_pass < 0:
            raise ValueError("batch_images and windows_per_pass must be >= 0")
        self.model = model
        self.batch_images = batch_images or coding.transform_batch(model.device)
        self.max_pixels = max_pixels
        self.windows_per_pass = windows_per_pass or coding.windows_per_pass(model.device)

    # ------------------------------------------------------------ latents

    def _open(self, data: bytes, prefix: bool = False) -> tuple[bs.Header, bytes]:
        self.model.check_codable()
        header, payload = bs.unpack(data, self.max_pixels, prefix=prefix)
        self.model.check_header(header)
        return header, payload

    @torch.inference_mode()
    @weights_fixed
    def decode_latent(self, data: bytes) -> tuple[bs.Header, torch.Tensor]:
        """Entropy-decode y_hat (C, h, w) of a whole stream and check it against the header's
        latent checksum."""
        header, payload = self._open(data)
        y_hat, _ = self._decode_steps(header, payload, self.model.cfg.num_steps)
        return header, coding.checked_latent(header, y_hat)

    @torch.inference_mode()
    @weights_fixed
    def decode_latents(self, streams: Sequence[bytes]) -> list:
        """decode_latent() of many whole streams, with the windows of many images in each
        transformer step (up to `windows_per_pass`). Returns, per stream in order, (header,
        y_hat) or the exception decode_latent would raise for it: one bad stream never fails
        the others. The exact model's integers do not depend on the batch, so each latent is
        the one decode_latent gives."""
        results: list = [None] * len(streams)
        # By adaptive order and by the entropy model's arithmetic (the format): one loop each.
        groups: dict[tuple[bool, bool], list] = {}
        for n, data in enumerate(streams):
            try:
                header, payload = self._open(data)
                decoders = self._chunk_decoders(header, payload, self.model.cfg.num_steps)
            except Exception as exc:
                results[n] = exc
                continue
            key = (bool(header.flags & bs.FLAG_ADAPTIVE_ORDER), bs.eight_bit_entropy(header.version))
            groups.setdefault(key, []).append((n, header, decoders))
        for (adaptive, _), images in groups.items():
            self._decode_together(images, adaptive, streams, results)
        return results

    def _decode_together(self, images: list, adaptive: bool, streams: Sequence[bytes], results: list) -> None:
        """Decode `images` ((index, header, chunk decoders); formats of one entropy model),
        their chunks in passes of up to windows_per_pass windows, into `results`. A chunk that
        fails fails its image; the image's pass-mates are decoded again on their own."""
        exact = self.model.exact_model(images[0][1].version)
        ww, C, device = self.model.cfg.window, self.model.cfg.C, self.model.device
        chunks, tokens, valid = [], {}, {}  # chunks: (image, first window, windows, decoder)
        for n, header, decoders in images:
            windows = coding.num_windows(header.height, header.width, ww)
            tokens[n] = torch.zeros(windows, ww * ww, C, dtype=torch.int32, device=device)
            valid[n] = coding.valid_tokens(coding.latent_size(header.height, header.width), ww, device)  # (nW, L)
            for c, start in enumerate(coding.chunk_starts(windows)):
                chunks.append((n, start, min(bs.CHUNK_WINDOWS, windows - start), (decoders[c], header, c)))
        failed: set[int] = set()
        for part in coding.passes(chunks, lambda c: c[2], self.windows_per_pass):
            part = [c for c in part if c[0] not in failed]
            if not part:
                continue
            keep = torch.cat([valid[n][a:a + k] for n, a, k, _ in part])  # (b, L)
            bounds = np.cumsum([0] + [k for _, _, k, _ in part])

            def decode(i: int, params: X.IntParams, positions: torch.Tensor) -> torch.Tensor:
                kept = keep.gather(1, positions)  # (b, n_i)
                values = torch.zeros(kept.shape + (C,), dtype=torch.int32, device=device)
                for (n, _, _, (decoder, header, c)), a, b in zip(part, bounds[:-1], bounds[1:]):
                    try:
                        values[a:b][kept[a:b]] = _decode_symbols(decoder, params.index(slice(a, b)).flat(kept[a:b]),
                                                                 C, device, header, i, c)
                    except bs.BitstreamError as exc:
                        raise _ChunkError(n, exc) from None
                return values

            rate = self.model.exact_rate([c[3][1].quality for c in part for _ in range(c[2])])
            try:
                out = coding.run_steps(exact, torch.zeros(int(bounds[-1]), ww * ww, C, dtype=torch.int32, device=device),
                                       decode, keep, adaptive, rate)
            except _ChunkError as exc:  # that image fails; its pass-mates are decoded again without it
                failed.add(exc.image)
                results[exc.image] = exc.error
                for n in sorted({c[0] for c in part} - failed):
                    try:
                        results[n] = self.decode_latent(streams[n])
                    except Exception as again:
                        results[n] = again
                    failed.add(n)
                continue
            for (n, a, k, _), lo in zip(part, bounds[:-1]):
                tokens[n][a:a + k] = out[lo:lo + k]
        for n, header, _ in images:
            if n in failed:
                continue
            h, w = coding.latent_size(header.height, header.width)
            try:
                results[n] = (header, coding.checked_latent(header, coding.latent_from_windows(tokens[n], h, w, ww)))
            except Exception as exc:
                results[n] = exc

    def _chunk_decoders(self, header: bs.Header, payload: bytes, steps: int) -> list[SymbolDecoder]:
        """Checks of the header against the model, then one entropy decoder per chunk, over
        the pieces of its first `steps` steps."""
        ww, S = self.model.cfg.window, self.model.cfg.num_steps
        windows = coding.num_windows(header.height, header.width, ww)
        chunks = len(coding.chunk_starts(windows))
        if header.payload_len < bs.min_payload_len(windows):
            # Checked before any model work: decoding time stays proportional to the bytes declared.
            raise bs.BitstreamError(
                f"corrupt bitstream: a {header.width}x{header.height} image needs at least "
                f"{bs.min_payload_len(windows)} payload bytes, the stream has {header.payload_len}")
        if (header.num_steps, header.num_chunks) != (S, chunks):
            raise bs.BitstreamError(
                f"corrupt header: its step table has {header.num_steps} steps x {header.num_chunks} chunks, the "
                f"model codes {S} steps and a {header.width}x{header.height} image is {chunks} chunks")
        if header.flags & bs.FLAG_ADAPTIVE_ORDER and self.model.cfg.mode != "mt":
            raise bs.BitstreamError("corrupt header: the adaptive-order flag is set for an M2T model")
        self.model.sync_exact()
        try:
            return [SymbolDecoder(s) for s in _chunk_streams(header, payload, steps)]
        except bs.BitstreamError:
            raise
        except Exception as exc:  # constriction rejects malformed word streams
            raise bs.BitstreamError(f"corrupt payload: {exc}") from None

    def _decode_steps(self, header: bs.Header, payload: bytes, steps: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decode the first `steps` steps of every window, chunk after chunk (memory bounded
        by one chunk); the tokens of later steps are the entropy model's prediction given what
        came before (the mixture mean, rounded where it is the model's context). Returns the
        latent as the model's context sees it, int32 (C, h, w), and for a preview the latent
        for g_s, float (C, h, w) with the unrounded means (None when steps = S)."""
        model = self.model
        ww, C, S, device = model.cfg.window, model.cfg.C, model.cfg.num_steps, model.device
        h, w = coding.latent_size(header.height, header.width)
        decoders = self._chunk_decoders(header, payload, steps)
        exact = model.exact_model(header.version)  # the integers this format codes with
        valid = coding.valid_tokens((h, w), ww, device)  # (nW, L)
        tokens = torch.zeros(valid.shape[0], ww * ww, C, dtype=torch.int32, device=device)
        filled = torch.zeros(tokens.shape, dtype=torch.float32, device=device) if steps < S else None
        for c, (decoder, start) in enumerate(zip(decoders, coding.chunk_starts(valid.shape[0]))):
            keep_chunk = valid[start:start + bs.CHUNK_WINDOWS]

            def decode(i: int, params: X.IntParams, positions: torch.Tensor) -> torch.Tensor:
                at = positions[..., None].expand(-1, -1, C)
                if i >= steps:  # not in the stream (a preview): the model's prediction
                    mean_q = mixture_mean_q(params.mean_q, params.logit_q)  # (b, n_i, C) 1/MEAN_STEPS
                    filled[start:start + len(positions)].scatter_(1, at, mean_q.float() / MEAN_STEPS)
                    return torch.div(2 * mean_q + MEAN_STEPS, 2 * MEAN_STEPS, rounding_mode="floor").clamp(
                        -MAX_ABS_SYMBOL, MAX_ABS_SYMBOL).to(torch.int32)
                keep = keep_chunk.gather(1, positions)  # (b, n_i)
                values = torch.zeros(keep.shape + (C,), dtype=torch.int32, device=device)
                values[keep] = _decode_symbols(decoder, params.flat(keep), C, device, header, i, c)
                if filled is not None:
                    filled[start:start + len(positions)].scatter_(1, at, values.float())
                return values

            coding.run_steps(exact, tokens[start:start + bs.CHUNK_WINDOWS], decode, keep_chunk,
                             bool(header.flags & bs.FLAG_ADAPTIVE_ORDER),
                             model.exact_rate([header.quality] * keep_chunk.shape[0]))
        y_hat = coding.latent_from_windows(tokens, h, w, ww)  # (C, h, w)
        return y_hat, None if filled is None else coding.latent_from_windows(filled, h, w, ww)

    # ------------------------------------------------------------ pixels

    @torch.inference_mode()
    @weights_fixed
    def preview(self, data: bytes, steps: int | None = None, max_bytes: int | None = None) -> Preview:
        """Decode the first `steps` coding steps (all of them by default), reading at most
        `max_bytes` of the stream: as many complete steps as fit. `data` may be a prefix of
        the stream (a ranged read); the steps it does not hold are predicted by the entropy
        model (the mixture mean given what was decoded), then g_s runs. A preview of all S
        steps from the whole stream is the full decode, bit for bit (latent checksum
        checked); a partial one has no checksum to check."""
        if steps is not None and steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        if max_bytes is not None:
            if max_bytes < 0:
                raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
            data = bytes(data[:max_bytes])
        header, payload = self._open(data, prefix=True)
        S = self.model.cfg.num_steps
        k = min(S if steps is None else steps, header.steps_in(len(data)))
        if k == S and len(payload) == header.payload_len:
            _, y = self.decode_latent(data)
        else:
            _, y = self._decode_steps(header, payload, k)  # k < S: the filled latent
        return Preview(image=self.model.synthesis(y, header.height, header.width, header.version, header.quality),
                       y=y, steps=k,
                       num_steps=S,
                       bytes_read=header.step_ends[k - 1] if k else header.size, total_bytes=header.step_ends[-1])

    @torch.inference_mode()
    @weights_fixed
    def decompress(self, data: bytes, steps: int | None = None, max_bytes: int | None = None) -> np.ndarray:
        """Decode a bitstream to RGB uint8 (H, W, 3).

        `steps` / `max_bytes` ask for a preview (see `preview`). Without them a stream cut
        exactly at a step boundary decodes as the preview of the steps it holds (with a
        `PartialStreamWarning`); cut anywhere else it is an error."""
        if steps is not None or max_bytes is not None:
            return self.preview(data, steps, max_bytes).image
        header = bs.read_header(data, self.max_pixels, prefix=True)
        if len(data) < header.step_ends[-1]:
            held = header.steps_in(len(data))
            if held == 0 or header.step_ends[held - 1] != len(data):
                bs.unpack(data, self.max_pixels)  # raises: truncated
            warnings.warn(PartialStreamWarning(
                f"the stream holds {held} of {header.num_steps} coding steps ({len(data)} of "
                f"{header.step_ends[-1]} bytes): decoded a preview"), stacklevel=2)
            return self.preview(data).image
        header, y_hat = self.decode_latent(data)
        return self.model.synthesis(y_hat, header.height, header.width, header.version, header.quality)

    @torch.inference_mode()
    @weights_fixed
    def decompress_many(self, streams: Sequence[bytes]) -> list:
        """decompress() of many whole streams, batched on the device: the entropy model over
        the windows of many images per step (`decode_latents`), then g_s `batch_images`
        latents at a time. Returns, per stream in order, RGB uint8 (H, W, 3) or the exception
        decompress would raise for it: one bad stream never fails the others. Latents are
        exactly decompress()'s; pixels equal them where g_s runs one image at a time (a CPU
        by default) and may differ in float rounding in a batch. A cut stream is an error
        here (decompress() previews it)."""
        results: list = list(self.decode_latents(streams))
        by_version: dict[int, list] = {}  # each format version has its own integer g_s
        for n, got in enumerate(results):
            if not isinstance(got, Exception):
                by_version.setdefault(got[0].version, []).append((n, got))
        for version, good in by_version.items():
            latents = [(y_hat, header.height, header.width, header.quality) for _, (header, y_hat) in good]
            try:
                images = self.model.synthesis_batch(latents, self.batch_images, version)
            except Exception:  # e.g. out of memory in a batch: one at a time, each failing alone
                images = []
                for latent in latents:
                    try:
                        images.append(self.model.synthesis(*latent[:3], version=version, quality_code=latent[3]))
                    except Exception as exc:
                        images.append(exc)
            for (n, _), image in zip(good, images):
                results[n] = image
        return results


def _decode_symbols(decoder: SymbolDecoder, flat: X.IntParams, C: int, device, header: bs.Header,
                    step: int, chunk: int) -> torch.Tensor:
    """The next symbols of a chunk's stream under `flat` (n, K) -> (n / C, C) int32, checked
    against the header's checksum of piece (step, chunk) (format 4 on)."""
    try:
        symbols = decoder.decode(snap_integer(flat.mean_q, flat.level, flat.logit_q))
    except Exception as exc:
        raise bs.BitstreamError(f"entropy decoding failed: {exc}") from None
    symbols = np.ascontiguousarray(symbols, dtype="<i4")
    want = header.piece_crc(step, chunk)
    if want is not None and bs.piece_checksum(header.height, header.width, symbols.tobytes()) != want:
        raise bs.BitstreamError(
            f"corrupt stream: step {step + 1} of {header.num_steps} (chunk {chunk + 1} of {header.num_chunks}) fails "
            "its checksum: damaged bytes, or a header that names another model or image size")
    return torch.from_numpy(symbols.astype(np.int32)).to(device).view(-1, C)


def _chunk_streams(header: bs.Header, payload: bytes, steps: int) -> list[bytes]:
    """Each chunk's range-coded stream, from the pieces of its first `steps` steps (which
    `payload`, possibly a prefix, must hold), zero-padded for the decoder's read-ahead."""
    out = [bytearray() for _ in range(header.num_chunks)]
    pos = 0
    for k, row in enumerate(header.step_pieces[:steps]):
        for c, size in enumerate(row):
            if pos + size > len(payload):
                raise bs.BitstreamError(f"truncated payload: step {k + 1} is not complete")
            out[c] += payload[pos:pos + size]
            pos += size
    pad = bytes(bs.WORD_BYTES * coding.STEP_READ_AHEAD_WORDS) if steps < header.num_steps else b""
    return [bytes(s) + pad for s in out]
