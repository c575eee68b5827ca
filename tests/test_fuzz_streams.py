"""Deterministic stream fuzzing (issue 13): mutated committed streams either decode or raise a
subclass of m2t_core.BitstreamError: never another exception, a crash, a hang or a blow-up.

Every `tests/data/golden-v<FORMAT_VERSION>-*.m2t` (globbed: the set of streams changes; the
retired versions' streams are refused as a whole, tests/test_golden.py) is mutated with a fixed seed: bit flips, truncations, byte insertions and deletions anywhere,
header edits with the header CRC recomputed (so the edited field is what gets checked), and
payload edits with the payload and header CRCs recomputed (so the entropy decoder itself sees
garbage). Each mutant is decoded by `m2t_core.decompress` (the model found from the header)
and through its preview path (`steps=4`), in a pool of 2 spawned worker processes, each with an address-space limit (RLIMIT_AS) and a
per-item time limit; a worker that dies fails the test.

A mutant whose header is still valid and names a golden stream's model and weights makes the
decoder run the network over the whole image (~0.4 s per stream on one core), so only the
first M2T_FUZZ_DEEP of those (default 60, alternately payload and header mutants) are
decoded; the others are counted and skipped. M2T_FUZZ_ITEMS (default 4000) and M2T_FUZZ_DEEP
raise the numbers on a bigger box. About 30 s on a 2-core VM.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).resolve().parent / "data"
SEED = 20261201
ITEMS = int(os.environ.get("M2T_FUZZ_ITEMS", "4000"))
DEEP = int(os.environ.get("M2T_FUZZ_DEEP", "60"))  # each decoded twice: full and preview
SHALLOW_LIMIT_S = 20.0  # per mutant that is refused from its header / checksums (they take ms)
DEEP_LIMIT_S = 120.0  # per mutant decoded in full (a 144x96 stream: < 1 s on one core; generous for busy VMs)
MEMORY_HEADROOM = 3 << 30  # address space a worker may add to what it had after importing torch
BATCH = 200
PREVIEW_STEPS = 4  # the preview path each mutant is decoded through too (m2t_core.decompress(steps=...))


# ---------------------------------------------------------------- worker side (spawned processes)


class _Timeout(Exception):
    pass


def _init_worker(headroom: int) -> None:
    import resource
    import signal

    import torch

    import m2t_core  # noqa: F401  (imports torch & co. before the limit is set)

    torch.set_num_threads(1)

    def on_alarm(signum, frame):
        raise _Timeout()

    signal.signal(signal.SIGALRM, on_alarm)
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = vm + headroom
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _decode_batch(items: list[tuple[int, bytes, float]], max_pixels: int) -> list[tuple[int, str, str]]:
    """(index, outcome, detail) per item; outcome: ok | bitstream_error | timeout | memory | other."""
    import signal
    import traceback

    import m2t_core

    def attempt(data: bytes, limit: float, steps: int | None) -> tuple[str, str]:
        signal.setitimer(signal.ITIMER_REAL, limit)
        try:
            rgb = m2t_core.decompress(data, max_pixels=max_pixels, steps=steps)
            header = m2t_core.read_header(data, max_pixels=max_pixels)
            ok = rgb.dtype == np.uint8 and rgb.shape == (header.height, header.width, 3)
            return ("ok", "") if ok else ("other", f"decoded array {rgb.dtype} {rgb.shape}")
        except _Timeout:
            return "timeout", f"over {limit} s"
        except m2t_core.BitstreamError as exc:
            return "bitstream_error", f"{type(exc).__name__}: {str(exc)[:200]}"
        except MemoryError:
            return "memory", "MemoryError"
        except BaseException as exc:  # noqa: BLE001  (anything else is the bug being looked for)
            return "other", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-1500:]}"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    out = []
    for index, data, limit in items:
        # The full decode, then the preview path (the first PREVIEW_STEPS steps): each must
        # decode or raise a BitstreamError; the outcome reported is the full decode's unless
        # the preview did worse. A shallow mutant's preview is decoded only where its header
        # is refused (cheap): the others are mostly truncations, i.e. valid prefixes.
        full = attempt(data, limit, None)
        if limit < DEEP_LIMIT_S:
            try:
                m2t_core.read_header(data, max_pixels=max_pixels, prefix=True)
                out.append((index, *full))
                continue
            except Exception:  # noqa: BLE001  (the preview below must raise it as a BitstreamError)
                pass
        preview = attempt(data, limit, PREVIEW_STEPS)
        worse = preview if preview[0] not in ("ok", "bitstream_error") else full
        out.append((index, worse[0], ("preview: " if worse is preview else "") + worse[1]))
    return out


# ---------------------------------------------------------------- mutations (driver side)


def _fix_header_crc(data: bytearray, header_len: int) -> None:
    struct.pack_into("<I", data, header_len - 4, zlib.crc32(bytes(data[:header_len - 4])))


def _header_len(stream: bytes) -> int:
    from m2t_core import bitstream as bs

    header, payload = bs.unpack(stream)
    return len(stream) - len(payload)


def _payload_crc_offset(stream: bytes, header_len: int) -> int:
    """Where the header stores the payload CRC: found by value (the 4 bytes before the header CRC
    in every format so far; searched, so a new layout does not need this test changed)."""
    from m2t_core import bitstream as bs

    header, payload = bs.unpack(stream)
    want = struct.pack("<I", header.payload_crc)
    pos = stream.rfind(want, 7, header_len - 4)
    assert pos >= 0
    return pos


def mutants(streams: dict[str, bytes], n: int, seed: int) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(seed)
    names = sorted(streams)
    out: list[tuple[str, bytes]] = []
    kinds = ["flip", "flips", "truncate", "insert", "delete", "header", "header", "payload"]
    while len(out) < n:
        name = names[int(rng.integers(len(names)))]
        s = streams[name]
        hl = _header_len(s)
        kind = kinds[int(rng.integers(len(kinds)))]
        d = bytearray(s)
        if kind == "flip":
            pos = int(rng.integers(len(d)))
            d[pos] ^= 1 << int(rng.integers(8))
            what = f"flip byte {pos}"
        elif kind == "flips":
            k = int(rng.integers(2, 9))
            for pos in rng.integers(len(d), size=k):
                d[int(pos)] ^= int(rng.integers(1, 256))
            what = f"{k} byte flips"
        elif kind == "truncate":
            cut = int(rng.integers(len(d)))
            d = d[:cut]
            what = f"truncate to {cut}"
        elif kind == "insert":
            pos, k = int(rng.integers(len(d) + 1)), int(rng.integers(1, 17))
            d[pos:pos] = rng.integers(0, 256, size=k, dtype=np.uint8).tobytes()
            what = f"insert {k} at {pos}"
        elif kind == "delete":
            pos = int(rng.integers(len(d)))
            k = int(rng.integers(1, 17))
            del d[pos:pos + k]
            what = f"delete {k} at {pos}"
        elif kind == "header":
            # Any header byte after the magic (version, flags, id length, id, hash, sizes,
            # lengths, CRCs), then the header CRC recomputed: the field itself is checked.
            pos = int(rng.integers(4, hl - 4))
            if rng.random() < 0.5:
                d[pos] ^= 1 << int(rng.integers(8))
            else:
                d[pos] = int(rng.choice([0, 1, 2, 0x7F, 0x80, 0xFF, int(rng.integers(256))]))
            _fix_header_crc(d, hl)
            what = f"header byte {pos} = {d[pos]:#04x}, header CRC fixed"
        else:
            # Payload bytes changed, the payload CRC and then the header CRC recomputed: only
            # the entropy decoder (and the latent CRC) can catch it.
            k = int(rng.integers(1, 5))
            for pos in rng.integers(hl, len(d), size=k):
                d[int(pos)] ^= int(rng.integers(1, 256))
            struct.pack_into("<I", d, _payload_crc_offset(s, hl), zlib.crc32(bytes(d[hl:])))
            _fix_header_crc(d, hl)
            what = f"{k} payload bytes changed, CRCs fixed"
        out.append((f"{name}: {what}", bytes(d)))
    return out


def _reaches_decoding(data: bytes, max_pixels: int, writers: set) -> tuple[bool, str | None]:
    """Whether the decoder will run the network over a mutant: a valid header naming the model
    and weights of a golden stream (`writers`: (model id, weights hash, version)), and that
    model's mode. Header parsing only."""
    from m2t_core import bitstream as bs
    from m2t_core.registry import installed_checkpoints, read_metadata

    try:
        header, _ = bs.unpack(data, max_pixels)
    except bs.BitstreamError:
        return False, None
    if (header.model_id, header.weights_hash, header.version) not in writers:
        return False, None  # refused by the model lookup (name + weights hash): cheap
    paths = installed_checkpoints(header.model_id)
    return True, (read_metadata(paths[0])[1].mode if paths else None)


# ---------------------------------------------------------------- the test


def test_mutated_streams_decode_or_raise_bitstream_errors():
    from m2t_core import bitstream as bs

    streams = {p.name: p.read_bytes() for p in sorted(DATA.glob(f"golden-v{bs.FORMAT_VERSION}-*.m2t"))}
    assert streams, f"no golden streams in {DATA}"
    headers = {n: bs.read_header(s) for n, s in streams.items()}
    max_pixels = 4 * max(h.height * h.width for h in headers.values())
    originals = set(streams.values())
    writers = {(h.model_id, h.weights_hash, h.version) for h in headers.values()}

    shallow, deep, skipped = [], [], 0
    for what, data in mutants(streams, ITEMS, SEED):
        if data in originals:
            continue  # a no-op mutation (e.g. a byte set to its own value)
        reaches, mode = _reaches_decoding(data, max_pixels, writers)
        if not reaches:
            shallow.append((what, data))
        elif len(deep) < DEEP and (len(deep) % 2 == 0) == ("payload" in what):
            deep.append((what, data))  # alternately payload and header mutants
        else:
            skipped += 1
    assert len(shallow) > ITEMS // 2

    labels = [w for w, _ in shallow] + [w for w, _ in deep]
    items = [(i, d, SHALLOW_LIMIT_S) for i, (_, d) in enumerate(shallow)]
    items += [(len(shallow) + i, d, DEEP_LIMIT_S) for i, (_, d) in enumerate(deep)]
    batches = [items[len(shallow) + i:len(shallow) + i + 1] for i in range(len(deep))]  # the slow ones first
    batches += [items[i:min(i + BATCH, len(shallow))] for i in range(0, len(shallow), BATCH)]

    results: dict[int, tuple[str, str]] = {}
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=2, mp_context=ctx, initializer=_init_worker,
                                initargs=(MEMORY_HEADROOM,)) as pool:
        futures = {pool.submit(_decode_batch, batch, max_pixels): batch for batch in batches}
        try:
            for future in cf.as_completed(futures, timeout=600):
                for index, outcome, detail in future.result():
                    results[index] = (outcome, detail)
        except cf.process.BrokenProcessPool as exc:  # a worker died: a crash or a hard memory kill
            done = set(results)
            pending = [labels[i] for b in batches for i, _, _ in b if i not in done]
            pytest.fail(f"a decoding worker died ({exc}); mutants not finished include: {pending[:10]}")
        except cf.TimeoutError:
            pending = [labels[i] for b in batches for i, _, _ in b if i not in results]
            for p in pool._processes.values():  # a hang in native code: do not wait for it
                p.kill()
            pytest.fail(f"decoding hung; unfinished mutants include: {pending[:10]}")

    assert len(results) == len(items)
    bad = [(labels[i], outcome, detail) for i, (outcome, detail) in sorted(results.items())
           if outcome not in ("ok", "bitstream_error")]
    assert not bad, f"{len(bad)} mutant(s) neither decoded nor raised a BitstreamError:\n" + "\n".join(
        f"  {label}: {outcome}: {detail}" for label, outcome, detail in bad[:20])
    counts = {}
    for outcome, _ in results.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    assert counts.get("bitstream_error", 0) > len(items) // 2
    print(f"fuzz: {len(items)} mutants decoded ({len(deep)} in full), {skipped} full decodes skipped; {counts}")
