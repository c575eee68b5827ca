#!/usr/bin/env python3
"""Hostile edits of a real stream, as an attacker would make them (a benchmark of the format's
checks, not a test): how many decode to a wrong image without an error.

    python bench/hostile_streams.py            # kodim01, m2t-small-q1 and mt-small-q2, ~3 min
    python bench/hostile_streams.py --quick    # fewer payload edits

Each edit keeps every checksum an attacker can recompute without the model (the header CRC,
the payload CRC): the size (within and across 16-pixel blocks), the model id with another
installed model's weights hash, the step table (words moved between pieces), payload bytes
inside the first steps' prefix, and plain bit flips inside that prefix. Every mutant is
decoded three ways: in full, as the preview of its first 4 steps (`steps=4`), and from the
prefix alone (`max_bytes` = the end of step 4). Each outcome is an error (a BitstreamError),
the same image as the unedited stream gives that way (an edit of a bit no decoded value
depends on), or **silent**: another image and no error. Writes
bench/results/hostile_streams.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import DEFAULT_DATA  # noqa: E402

PREVIEW_STEPS = 4


def _repack(header, payload: bytes) -> bytes:
    """A stream with the payload CRC recomputed (the header CRC is written by to_bytes)."""
    from m2t_core import bitstream as bs

    return bs.pack(dataclasses.replace(header, payload_crc=zlib.crc32(payload), payload_len=len(payload)), payload)


def mutants(stream: bytes, other_models: dict[str, bytes], rng: np.random.Generator, payload_edits: int):
    from m2t_core import bitstream as bs

    header, payload = bs.unpack(stream)
    prefix_end = header.step_ends[PREVIEW_STEPS - 1] - header.size  # payload bytes of the first steps
    out = []
    for dh, dw in ((-1, 0), (1, 0), (0, -1), (0, 1), (16, 0), (0, 16), (-16, 0), (0, -16)):
        out.append((f"size {dh:+d},{dw:+d}", _repack(dataclasses.replace(header, height=header.height + dh,
                                                                          width=header.width + dw), payload)))
    for name, weights in other_models.items():
        out.append((f"model id -> {name}", _repack(dataclasses.replace(header, model_id=name, weights_hash=weights),
                                                   payload)))
    rows = [list(r) for r in header.step_pieces]
    for k in range(min(PREVIEW_STEPS, header.num_steps - 1)):
        if rows[k][0] >= bs.WORD_BYTES:  # one word moved from step k's piece to step k+1's
            moved = [r[:] for r in rows]
            moved[k][0] -= bs.WORD_BYTES
            moved[k + 1][0] += bs.WORD_BYTES
            out.append((f"step table {k + 1}->{k + 2}",
                        _repack(dataclasses.replace(header, step_pieces=tuple(map(tuple, moved))), payload)))
    for i in range(payload_edits):
        pos = int(rng.integers(prefix_end))
        edited = bytearray(payload)
        edited[pos] = int(rng.integers(256))
        out.append((f"payload byte {pos} (CRC recomputed)", _repack(header, bytes(edited))))
        flipped = bytearray(stream)
        at = header.size + int(rng.integers(prefix_end))
        flipped[at] ^= 1 << int(rng.integers(8))
        out.append((f"bit flip at {at}", bytes(flipped)))
    return out, header.step_ends[PREVIEW_STEPS - 1]


def outcome(decode, data: bytes, clean: np.ndarray) -> str:
    from m2t_core import BitstreamError

    try:
        image = decode(data)
    except BitstreamError:
        return "error"
    return "unchanged" if image.shape == clean.shape and np.array_equal(image, clean) else "silent"


def main(argv: list[str] | None = None) -> int:
    import warnings

    from m2t_core import Encoder, load_model
    from m2t_core.image_io import load_image
    from m2t_core.registry import PACKAGE_WEIGHTS
    from m2t_core.sysinfo import cpu_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", type=Path, default=DEFAULT_DATA / "kodak" / "kodim01.png")
    ap.add_argument("--models", default="m2t-small-q1,mt-small-q2")
    ap.add_argument("--quick", action="store_true", help="10 payload edits and 10 bit flips per model (else 40)")
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "hostile_streams.json")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")  # previews of cut streams warn; the outcome is what counts
    rgb = load_image(args.image)
    installed = {p.stem: load_model(p.stem).weights_hash() for p in sorted(PACKAGE_WEIGHTS.glob("*.safetensors"))}
    report = {"benchmark": "hostile_streams", "image": args.image.name, "cpu": cpu_model(), "models": {}}
    rng = np.random.default_rng(2026)
    for name in args.models.split(","):
        model = load_model(name)
        stream = Encoder(model).encode_image(rgb).bitstream
        others = {n: h for n, h in installed.items() if n != name}
        edits, prefix_len = mutants(stream, others, rng, 10 if args.quick else 40)
        ways = {
            "full": lambda d: load_model_for(d).decompress(d),
            "preview": lambda d: load_model_for(d).decompress(d, steps=PREVIEW_STEPS),
            "prefix": lambda d: load_model_for(d).decompress(d[:prefix_len], steps=PREVIEW_STEPS),
        }
        clean = {way: decode(stream) for way, decode in ways.items()}
        counts = {way: {"error": 0, "unchanged": 0, "silent": 0} for way in ways}
        silent = []
        for label, data in edits:
            for way, decode in ways.items():
                result = outcome(decode, data, clean[way])
                counts[way][result] += 1
                if result == "silent":
                    silent.append(f"{way}: {label}")
        report["models"][name] = {"edits": len(edits), "outcomes": counts, "silent": silent}
        print(f"{name}: {len(edits)} edits x 3 ways: {json.dumps(counts)}; silent: {silent or 'none'}", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


def load_model_for(data: bytes):
    """The installed model the stream's header names (name and weights hash), as m2t does."""
    from m2t_core import load_model_for_header, read_header

    return load_model_for_header(read_header(data, prefix=True))


if __name__ == "__main__":
    sys.exit(main())
