"""The encoder: images -> bitstreams, in a device stage and a coding stage.

    encoder = Encoder(model, batch_images=16, coding_threads=7)      # a GPU worker
    for tag, result in encoder.encode_tagged((key, rgb) for key, rgb in images):
        ...                                                           # EncodedImage or the exception
    stream = Encoder(model).encode_image(rgb).bitstream               # one image

The device stage (`Encoder.plan`) runs g_a, then the exact entropy model over the windows of
many images, and hands every symbol with its integer parameters to the CPU as a
`CodingPlan`. The coding stage (`code_plan`) range-codes a plan; it needs no model, so
`coding_threads` threads code one batch while the device plans the next. The exact model's
integers do not depend on what else is in a pass, so the bytes of an image are the same in
any batch, thread count or device (tests/test_batched_coding.py); only a batched g_a (a
GPU's) may round a few latent values differently, and any latent codes and decodes exactly.
"""

from __future__ import annotations

import logging
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from . import bitstream as bs
from . import coding
from . import exact as X
from . import refine
from .entropy_coding import SymbolEncoder, snap_integer
from .image_io import ImageLike, to_rgb_array
from .model import M2TCodec, weights_fixed

log = logging.getLogger(__name__)


@dataclass
class EncodedImage:
    bitstream: bytes
    y_hat: torch.Tensor  # (C, h, w) int32 on CPU
    height: int
    width: int
    x_hat: np.ndarray | None = None  # the decoder's output (RGB uint8), where the encoder computed it

    @property
    def bpp(self) -> float:
        return 8.0 * len(self.bitstream) / (self.height * self.width)


@dataclass
class CodingPlan:
    """What the device stage hands to the coding stage for one image: every symbol with its
    integer parameters, on the CPU. Coding it needs no model and no device."""

    model_id: str
    weights_hash: bytes
    height: int
    width: int
    y_int: torch.Tensor  # (C, h, w) int32, CPU
    num_windows: int
    steps: list  # per chunk, per step: (symbols (n,) int64 ndarray, IntParams (n, K) int CPU tensors)
    adaptive_order: bool = False
    on_cuda: bool = False
    x_hat: np.ndarray | None = field(default=None, repr=False)  # the reconstruction, when asked for
    version: int = bs.FORMAT_VERSION  # the format to write (Encoder.format_version)
    quality: int | None = None  # a variable-rate model's quality code (format 6)


def code_plan(plan: CodingPlan) -> EncodedImage:
    """The coding stage: range-code a plan into a bitstream. Each chunk of windows has its own
    range coder; after each step the coder's num_words() says how many words a decoder of
    that step needs (STEP_READ_AHEAD_WORDS past what it has committed), and the payload
    holds those step pieces step-major (`_interleave_steps`), so a prefix of it decodes the
    first steps of every window."""
    streams: list[bytes] = []
    marks: list[list[int]] = []
    crcs: list[list[int]] = []  # per chunk, per step
    for chunk_steps in plan.steps:
        encoder = SymbolEncoder()
        chunk_marks: list[int] = []
        crcs.append([])
        for symbols, params in chunk_steps:
            encoder.encode(symbols, snap_integer(params.mean_q, params.level, params.logit_q))
            chunk_marks.append(encoder.num_words())
            crcs[-1].append(bs.piece_checksum(plan.height, plan.width, np.asarray(symbols, dtype="<i4").tobytes()))
        streams.append(encoder.finish())
        marks.append(chunk_marks)
    min_len = bs.min_payload_len(plan.num_windows)
    streams[-1] += bytes(max(0, min_len - sum(map(len, streams))))  # zero words: still valid
    payload, pieces = _interleave_steps(streams, marks)
    header = bs.Header(
        model_id=plan.model_id, weights_hash=plan.weights_hash, height=plan.height, width=plan.width,
        payload_len=len(payload), latent_crc=coding.latent_checksum(plan.y_int, plan.height, plan.width),
        payload_crc=zlib.crc32(payload), step_pieces=pieces,
        piece_crcs=tuple(crcs[c][k] for k in range(len(pieces)) for c in range(len(crcs))),  # step-major
        flags=(bs.FLAG_CUDA if plan.on_cuda else 0) | (bs.FLAG_ADAPTIVE_ORDER if plan.adaptive_order else 0),
        version=plan.version, quality=plan.quality,
    )
    return EncodedImage(bs.pack(header, payload), plan.y_int, plan.height, plan.width, plan.x_hat)


def _interleave_steps(streams: list[bytes], marks: list[list[int]]) -> tuple[bytes, tuple]:
    """The payload from each chunk's range-coded stream and the coder's num_words() after
    each step: piece (k, c) = chunk c's words from the end of step k-1's prefix to the end of
    step k's, laid out step-major. Returns (payload, step_pieces in bytes)."""
    W = bs.WORD_BYTES
    ends = []
    for stream, chunk_marks in zip(streams, marks):
        words, prev, chunk_ends = len(stream) // W, 0, []
        for k, mark in enumerate(chunk_marks):
            end = words if k == len(chunk_marks) - 1 else min(words, max(prev, mark + coding.STEP_READ_AHEAD_WORDS))
            chunk_ends.append(end)
            prev = end
        ends.append(chunk_ends)
    pieces, parts = [], []
    for k in range(len(marks[0])):
        row = []
        for c, stream in enumerate(streams):
            lo, hi = (ends[c][k - 1] if k else 0) * W, ends[c][k] * W
            parts.append(stream[lo:hi])
            row.append(hi - lo)
        pieces.append(tuple(row))
    return b"".join(parts), tuple(pieces)


class Encoder:
    """Encodes images with `model` (in eval mode).

    batch_images: images per g_a / g_s call and per entropy-model pass group (0: the
      device's default, coding.TRANSFORM_BATCH: 1 on a CPU, 16 on a GPU);
    coding_threads: threads that range-code a batch while the device plans the next (0:
      code on the caller's thread, after each batch's device stage);
    reconstruct: also compute the decoder's output (EncodedImage.x_hat) with the device's
      g_s, for PSNR;
    adaptive_order: MT models only: each step's positions chosen by the model's confidence;
    windows_per_pass: entropy-model windows per pass (0: coding.WINDOWS_PER_PASS);
    format_version: the bitstream format to write: 5 (default), or 4 for decoders of m2t
      0.4-0.5 (the same bytes but the version and weights hash; it decodes with integer-v1).
      The reconstruction is that format's decoder output. A variable-rate model writes 6.
    quality: a variable-rate model's quality Q in [1, K] (rate.py; None: its middle level);
      encode_image can override it per image. A fixed-rate model takes none;
    refine_steps: gradient steps that refine each image's latent for the model's own rate-
      distortion objective before coding (refine.py: fewer bits and a higher PSNR for the same
      decoder, at the cost of g_s and the entropy model's forward and backward pass per step;
      0: off). Needs an M2T model and the lambda it was trained for (its checkpoint records it)."""

    def __init__(self, model: M2TCodec, *, batch_images: int = 0, coding_threads: int = 0,
                 max_pixels: int = bs.DEFAULT_MAX_PIXELS, reconstruct: bool = False, adaptive_order: bool = False,
                 windows_per_pass: int = 0, format_version: int | None = None, quality: float | None = None,
                 refine_steps: int = 0):
        format_version = model.write_version(format_version)
        self.quality_code = model.quality_code(quality)
        if refine_steps < 0:
            raise ValueError(f"refine_steps must be >= 0, got {refine_steps}")
        if refine_steps:
            refine.model_lambda(model, self.quality_code)  # raises here, not per image: an MT model, no lambda
        self.refine_steps = refine_steps
        if adaptive_order and model.cfg.mode != "mt":
            raise ValueError("adaptive_order needs an MT model (M2T's attention mask fixes its order)")
        if batch_images < 0 or coding_threads < 0 or windows_per_pass < 0:
            raise ValueError("batch_images, coding_threads and windows_per_pass must be >= 0")
        self.model = model
        self.batch_images = batch_images or coding.transform_batch(model.device)
        self.coding_threads = coding_threads
        self.max_pixels = max_pixels
        self.reconstruct = reconstruct
        self.adaptive_order = adaptive_order
        self.format_version = format_version
        self.windows_per_pass = windows_per_pass or coding.windows_per_pass(model.device)
        self.device_seconds = 0.0  # time spent in the device stage so far (g_a, entropy model, g_s)

    # ------------------------------------------------------------ one image

    def encode_image(self, image: ImageLike, quality: float | None = None) -> EncodedImage:
        """One image -> its EncodedImage (raises ImageError, ImageTooLargeError, ...); a
        variable-rate model's at `quality` (None: the encoder's)."""
        [(_, result)] = list(self.encode_tagged([(None, image)], quality=quality))
        if isinstance(result, Exception):
            raise result
        return result

    def encode_latent(self, y_hat: torch.Tensor, height: int, width: int,
                      quality_code: int | None = None) -> EncodedImage:
        """y_hat (C, h, w) integer-valued -> its bitstream (the device stage, then the coding
        stage, for one image); a variable-rate model's latent at `quality_code` (None: the
        encoder's), the code its gains scaled it with."""
        code = self.quality_code if quality_code is None else quality_code
        return code_plan(self.plan([(y_hat, height, width, code)])[0])

    # ------------------------------------------------------------ a stream of images

    def encode(self, images: Iterable[ImageLike]) -> Iterator[EncodedImage | Exception]:
        """encode_tagged without tags: one result per image, in order."""
        for _, result in self.encode_tagged((None, image) for image in images):
            yield result

    def encode_tagged(self, items: Iterable[tuple[Any, ImageLike | Exception]], quality: float | None = None
                      ) -> Iterator[tuple[Any, EncodedImage | Exception]]:
        """(tag, image) pairs -> (tag, EncodedImage or the exception that stopped it), in input
        order. An item may be an exception already (an image its reader could not decode): it
        is passed through in its place. Images are taken `batch_images` at a time; with coding
        threads, a batch is range-coded while the device plans the next one. One bad image
        fails alone. `quality`: a variable-rate model's, for these images (None: the encoder's)."""
        self.model.check_codable()
        code = self.quality_code if quality is None else self.model.quality_code(quality)
        pool = ThreadPoolExecutor(self.coding_threads, thread_name_prefix="m2t-code") if self.coding_threads else None
        try:
            waiting: list | None = None  # the previous batch, being coded meanwhile
            for batch in _batches(items, self.batch_images):
                t0 = time.perf_counter()
                staged = self._device_stage(batch, code)
                self.device_seconds += time.perf_counter() - t0
                coded = [p if isinstance(p, Exception) else pool.submit(_code_or_error, p) if pool
                         else _code_or_error(p) for p in staged]
                if waiting is not None:
                    yield from _finish(*waiting)
                waiting = ([tag for tag, _ in batch], coded)
            if waiting is not None:
                yield from _finish(*waiting)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def _device_stage(self, batch: list[tuple[Any, Any]], code: int | None) -> list:
        """The plans of a batch (with their reconstructions when asked), or each image's error.
        A batch that fails as a whole is redone one image at a time, so the error lands on the
        image that caused it."""
        staged: list = [None] * len(batch)
        todo = []
        for n, (_, image) in enumerate(batch):
            if isinstance(image, Exception):
                staged[n] = image
                continue
            try:
                rgb = to_rgb_array(image)
                bs.check_image_size(rgb.shape[0], rgb.shape[1], self.max_pixels)
            except Exception as exc:
                staged[n] = exc
                continue
            todo.append((n, rgb))
        if len(todo) > 1:
            try:
                for (n, _), plan in zip(todo, self._plan_images([rgb for _, rgb in todo], code)):
                    staged[n] = plan
                return staged
            except Exception as exc:  # find the image that failed; the others are coded as usual
                log.warning("a batch of %d images failed (%s): coding them one at a time", len(todo), exc)
        for n, rgb in todo:
            try:
                staged[n] = self._plan_images([rgb], code)[0]
            except Exception as exc:
                staged[n] = exc
        return staged

    @torch.inference_mode()
    def _plan_images(self, rgbs: list[np.ndarray], code: int | None) -> list[CodingPlan]:
        model = self.model
        if self.refine_steps:  # one image at a time: each its own optimisation
            ys = [refine.refined_y_hat(model, rgb, model.latent(rgb), self.refine_steps, code) for rgb in rgbs]
        else:
            ys = model.analysis_batch(rgbs, self.batch_images, [code] * len(rgbs))
        latents = [(y, rgb.shape[0], rgb.shape[1], code) for y, rgb in zip(ys, rgbs)]
        plans = self.plan(latents)
        if self.reconstruct:
            x_hats = model.synthesis_batch(latents, self.batch_images, self.format_version)
            for plan, x_hat in zip(plans, x_hats):
                plan.x_hat = x_hat
        return plans

    # ------------------------------------------------------------ the device stage

    @torch.inference_mode()
    @weights_fixed
    def plan(self, latents: Sequence[tuple]) -> list[CodingPlan]:
        """The device stage of encoding: for each (y_hat (C, h, w), H, W) (a variable-rate
        model's (y_hat, H, W, quality code)), every symbol of every chunk and step with its
        integer parameters, moved to the CPU for `code_plan`.

        The windows of all the images go through the entropy model together, up to
        `windows_per_pass` at a time, each image's chunks whole. M2T's parameters come from
        one teacher-forced pass; MT runs the decoder's loop (the encoder knows every token,
        so no coding is needed between its steps)."""
        model = self.model
        model.check_codable()
        model.sync_exact()
        ww, C, device = model.cfg.window, model.cfg.C, model.device
        identity = (model.model_id, model.weights_hash(self.format_version))
        plans: list[CodingPlan] = []
        chunks: list[tuple[CodingPlan, int, torch.Tensor, torch.Tensor]] = []
        for item in latents:
            (y_hat, H, W), code = item[:3], (item[3] if len(item) > 3 else self.quality_code)
            model.check_quality_code(code)
            y_int = y_hat.to(device, torch.int32)
            truth = coding.latent_windows(y_int, ww)  # (nW, L, C) int32
            valid = coding.valid_tokens(y_hat.shape[-2:], ww, device)  # (nW, L)
            starts = coding.chunk_starts(truth.shape[0])
            plan = CodingPlan(*identity, H, W, y_int.cpu(), truth.shape[0], [[] for _ in starts],
                              self.adaptive_order, device.type == "cuda", version=self.format_version, quality=code)
            plans.append(plan)
            for c, start in enumerate(starts):
                end = start + bs.CHUNK_WINDOWS
                chunks.append((plan, c, truth[start:end], valid[start:end]))
        groups = model.layout.groups(device)
        exact = model.exact_model(self.format_version)  # the integers this format codes with
        for part in coding.passes(chunks, lambda c: c[2].shape[0], self.windows_per_pass):
            truth = torch.cat([c[2] for c in part])  # (b, L, C)
            keep = torch.cat([c[3] for c in part])  # (b, L)
            bounds = np.cumsum([0] + [c[2].shape[0] for c in part])
            rate = model.exact_rate([c[0].quality for c in part for _ in range(c[2].shape[0])])

            def record(step: int, params: X.IntParams, positions: torch.Tensor) -> torch.Tensor:
                values = truth.gather(1, positions[..., None].expand(-1, -1, C))  # (b, n_i, C)
                kept = keep.gather(1, positions)  # (b, n_i)
                for (plan, c, _, _), a, b in zip(part, bounds[:-1], bounds[1:]):
                    flat = params.index(slice(a, b)).flat(kept[a:b])
                    plan.steps[c].append((values[a:b][kept[a:b]].reshape(-1).to("cpu", torch.int64).numpy(),
                                          X.IntParams(*(t.cpu() for t in (flat.mean_q, flat.level, flat.logit_q)))))
                return values

            if model.cfg.mode == "m2t":  # every step's parameters from one pass (exact: the same)
                every = coding.teacher_forced(exact, truth, rate)  # (b, L, C, K)
                for step, group in enumerate(groups):
                    record(step, every.index((slice(None), group)), group[None].expand(truth.shape[0], -1))
            else:
                coding.run_steps(exact, torch.zeros_like(truth), record, keep, self.adaptive_order, rate)
        return plans


def _code_or_error(plan: CodingPlan) -> EncodedImage | Exception:
    try:
        return code_plan(plan)
    except Exception as exc:
        return exc


def _finish(tags: list, coded: list) -> Iterator[tuple[Any, EncodedImage | Exception]]:
    for tag, result in zip(tags, coded):
        yield tag, (result.result() if isinstance(result, Future) else result)


def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
