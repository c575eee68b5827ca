"""What the encoder and the decoder share: the window layout of a latent, the coding loop
over steps, the latent checksum and the sizes of device passes.

Payload order (format 3): the latent's windows in raster order, CHUNK_WINDOWS at a time,
each chunk its own range coder; within a chunk, step by step (each step's windows in order,
then position within the group, then channel). `run_steps` is the decoder's loop; the
encoder runs it too where the parameters of a step depend on the positions chosen before
(MT), and otherwise takes every step's parameters from one teacher-forced pass (M2T): the
exact model gives the same integers either way.
"""

from __future__ import annotations

import math
import struct
import zlib
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from . import bitstream as bs
from . import exact as X
from . import network as N

# Windows the entropy model takes in one pass (the encoder's plan, batched decoding); a pass
# holds whole chunks, at least one. On a CPU one chunk: merging images' chunks makes the
# integer attention's score tensors outgrow the caches (4 Kodak images planned in passes of 2
# took 0.59 s per image, one at a time 0.45 s: bench/codec_speed.py --stages). A GPU needs
# many images' windows at once to be busy.
WINDOWS_PER_PASS = {"cpu": 1, "cuda": 16 * bs.CHUNK_WINDOWS}
# Images per g_a / g_s call: one on a CPU, where a batch is slower per image
# (bench/codec_speed.py); a GPU needs many.
TRANSFORM_BATCH = {"cpu": 1, "cuda": 16}
# A decoder of steps 1..k reads at most this many words past what the encoder had committed
# after step k (num_words() counts those plus 1-2 sealing words; the range coder's state is 2
# words), so the prefix that ends there decodes steps 1..k exactly.
STEP_READ_AHEAD_WORDS = 2


def windows_per_pass(device: torch.device) -> int:
    return WINDOWS_PER_PASS.get(device.type, bs.CHUNK_WINDOWS)


def transform_batch(device: torch.device) -> int:
    return TRANSFORM_BATCH.get(device.type, 1)


# ---------------------------------------------------------------------- windows


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


def latent_windows(y: torch.Tensor, window: int) -> torch.Tensor:
    """One latent (C, h, w) as its windows (nW, L, C), zero-padded."""
    return to_windows(pad_latent(y[None], window), window)


def latent_from_windows(windows: torch.Tensor, h: int, w: int, window: int) -> torch.Tensor:
    """The inverse of latent_windows: (nW, L, ...) -> (..., h, w), contiguous."""
    hp, wp = h + (-h) % window, w + (-w) % window
    return from_windows(windows, 1, hp, wp, window)[0, ..., :h, :w].contiguous()


def valid_tokens(latent_hw, window: int, device) -> torch.Tensor:
    """(nW, L) bool: the latent positions of each window that exist (not padding)."""
    h, w = latent_hw
    return to_windows(pad_latent(torch.ones(1, 1, h, w, device=device), window), window)[..., 0] > 0


def latent_size(height: int, width: int) -> tuple[int, int]:
    """The latent's (h, w) for an image of height x width pixels."""
    return math.ceil(height / bs.DOWNSAMPLING), math.ceil(width / bs.DOWNSAMPLING)


def num_windows(height: int, width: int, window: int) -> int:
    h, w = latent_size(height, width)
    return math.ceil(h / window) * math.ceil(w / window)


def chunk_starts(windows: int) -> range:
    """The first window of every chunk (each its own range coder in format 3)."""
    return range(0, windows, bs.CHUNK_WINDOWS)


def passes(chunks: list, size: Callable, limit: int) -> Iterator[list]:
    """Consecutive runs of whole chunks of at most `limit` windows (at least one chunk each)."""
    i = 0
    while i < len(chunks):
        j, n = i + 1, size(chunks[i])
        while j < len(chunks) and n + size(chunks[j]) <= limit:
            n += size(chunks[j])
            j += 1
        yield chunks[i:j]
        i = j


# ---------------------------------------------------------------------- checksums


def same_size_runs(sizes: list, batch: int) -> list[list[int]]:
    """Indices of items of one size, `batch` at a time; runs of one item are left out (they
    take the one-at-a-time path)."""
    if batch < 2:
        return []
    by_size: dict = {}
    for i, size in enumerate(sizes):
        by_size.setdefault(size, []).append(i)
    return [idx[s:s + batch] for idx in by_size.values() for s in range(0, len(idx), batch)
            if len(idx[s:s + batch]) > 1]


def latent_checksum(y_int: torch.Tensor, height: int, width: int) -> int:
    """CRC-32 of the image size, the latent shape and y_hat (int32, C x h x w, C order): a
    header whose size was edited no longer matches its latent."""
    C, h, w = y_int.shape
    prefix = struct.pack("<5I", height, width, C, h, w)
    return zlib.crc32(np.ascontiguousarray(y_int.numpy(), dtype="<i4").tobytes(), zlib.crc32(prefix))


def checked_latent(header: bs.Header, y_hat: torch.Tensor) -> torch.Tensor:
    """y_hat (C, h, w) as float, after checking it against the header's latent checksum."""
    if latent_checksum(y_hat.to(torch.int32).cpu(), header.height, header.width) != header.latent_crc:
        raise bs.ChecksumMismatchError(
            "decoded latent or image size does not match the encoder's checksum: the stream is "
            "corrupt (its payload and header checksums were consistent, so it was written wrongly "
            "or tampered with)")
    return y_hat.float()


# ---------------------------------------------------------------------- the step loop


def confident_positions(params: X.IntParams, masked: torch.Tensor, valid: torch.Tensor,
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


def run_steps(exact: X.ExactEntropyModel, tokens: torch.Tensor,
              code: Callable[[int, X.IntParams, torch.Tensor], torch.Tensor],
              valid: torch.Tensor, adaptive_order: bool = False, rate=None) -> torch.Tensor:
    """The decoder's loop over windows `tokens` (b, L, C) int32: for each step i, the
    parameters of the positions coded at step i (b, n_i) (incrementally, with the key/value
    cache for M2T), then `code(i, params, positions)` returns their values (b, n_i, C),
    written into `tokens`. Only what was written before a step is read by it.

    The positions are the schedule's group i, or with `adaptive_order` (MT) the n_i still
    masked positions the model is most confident about (`confident_positions`): both sides
    compute them from the same exact integers. `rate`: a variable-rate model's rate.ExactRate
    of the windows."""
    ops = X.CodingOps(exact, rate)
    b, L, C = tokens.shape
    if not adaptive_order:
        state = N.DecodeState()
        for i, group in enumerate(exact.layout.groups(tokens.device)):
            tokens[:, group] = code(i, N.step(ops, tokens, state), group[None].expand(b, -1))
        return tokens
    if exact.cfg.mode != "mt":
        raise bs.BitstreamError("the confidence-adaptive order is defined for MT models only")
    sched = exact.layout.sched
    rank = torch.empty(L, dtype=torch.int64, device=tokens.device)
    rank[torch.as_tensor(sched.order, device=tokens.device)] = torch.arange(L, device=tokens.device)
    masked = torch.ones(b, L, dtype=torch.bool, device=tokens.device)
    for i, n_i in enumerate(sched.sizes):
        every = N.mt_forward(ops, tokens, masked)  # (b, L, C, K)
        positions = confident_positions(every, masked, valid, rank, n_i)  # (b, n_i)
        at = positions[..., None, None].expand(-1, -1, C, every.mean_q.shape[-1])
        params = X.IntParams(*(t.gather(1, at) for t in (every.mean_q, every.level, every.logit_q)))
        tokens.scatter_(1, positions[..., None].expand(-1, -1, C), code(i, params, positions))
        masked.scatter_(1, positions, False)
    return tokens


# Windows per teacher-forced call: a memory bound only (the integers do not depend on it).
TEACHER_FORCED_WINDOWS = 16


def teacher_forced(exact: X.ExactEntropyModel, windows: torch.Tensor, rate=None) -> X.IntParams:
    """M2T's parameters of every position of `windows` (b, L, C) from teacher-forced passes,
    TEACHER_FORCED_WINDOWS per call, kept as int32 (b, L, C, K) (a variable-rate model's with
    the windows' rate.ExactRate)."""
    T = TEACHER_FORCED_WINDOWS
    parts = [N.m2t_teacher_forced(X.CodingOps(exact, None if rate is None else rate.rows(s, s + T)), windows[s:s + T])
             for s in range(0, windows.shape[0], T)]
    return X.IntParams(*(torch.cat([getattr(p, f).to(torch.int32) for p in parts])
                         for f in ("mean_q", "level", "logit_q")))
