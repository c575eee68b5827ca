"""The codec's own commands of the `m2t` command line (single images, one machine):

    m2t encode IN.png OUT.m2t [--model NAME_OR_PATH]
    m2t decode IN.m2t OUT.png
    m2t info IN.m2t
    m2t models

This module knows nothing of the packages built on the codec. The full `m2t` program (these
commands plus the dataset-scale ones) is assembled on top of it from the pieces here:
`new_parser()`, `add_codec_commands(subparsers)`, `CODEC_COMMANDS` and `run_command()`.
`python -m m2t_core.cli ...` runs the codec commands alone (a codec-only install).

Errors print one line to stderr and exit with status 2 (no traceback); M2T_DEBUG=1 shows it.
Output into a pipe whose reader left (`m2t info x.m2t | head -1`) ends quietly with 141.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, NoReturn

EXIT_ERROR = 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader left
PROCESS_START = time.perf_counter()  # this module loads first: start-up is measured from here


class CliError(Exception):
    pass


def _model(name: str | None, device: str):
    from .allocator import keep_freed_memory
    from .registry import load_model

    keep_freed_memory()  # a command that codes: freed tensors stay for the next (allocator.py)
    return load_model(name, device=device)


def _startup(t0: float) -> float:
    """Seconds from this module's import to `t0` (importing torch, loading the model)."""
    return t0 - PROCESS_START


def _device(arg: str) -> str:
    if arg != "auto":
        return arg
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cmd_encode(args) -> int:
    from .bitstream import QUALITY_ONE
    from .encoder import Encoder

    if args.refine < 0:
        raise CliError(f"--refine takes a number of steps >= 0, got {args.refine}")
    if args.target_bpp is not None or args.target_psnr is not None:
        return _encode_to_target(args)
    if args.ladder is not None:
        raise CliError("--ladder goes with --target-bpp or --target-psnr")
    model = _model(args.model, _device(args.device))
    rgb = _load_input(args)
    t0 = time.perf_counter()
    try:
        encoder = Encoder(model, max_pixels=args.max_pixels, reconstruct=args.psnr, adaptive_order=args.adaptive_order,
                          format_version=args.format_version, quality=args.quality, refine_steps=args.refine)
    except ValueError as exc:  # a quality out of range or for a fixed-rate model; --refine with an MT model, no lambda
        raise CliError(str(exc)) from None
    encoded = encoder.encode_image(rgb)
    elapsed = time.perf_counter() - t0
    Path(args.output).write_bytes(encoded.bitstream)
    h, w = rgb.shape[:2]
    line = f"{args.input} -> {args.output}: {w}x{h}, {len(encoded.bitstream)} bytes, {encoded.bpp:.4f} bpp"
    if args.psnr:
        from .metrics import psnr

        line += f", PSNR {psnr(rgb, encoded.x_hat):.2f} dB"
    if encoder.quality_code is not None:
        line += f", quality {encoder.quality_code / QUALITY_ONE:g}"
    if args.refine:
        line += f", refined in {args.refine} steps"
    print(f"{line}, model {model.model_id}, {elapsed:.2f} s (start-up {_startup(t0):.2f} s: torch, model)")
    return 0


def _load_input(args):
    from .image_io import load_image

    notes: list[str] = []
    rgb = load_image(args.input, max_pixels=args.max_pixels, notes=notes)
    for note in notes:  # e.g. a multi-frame GIF/TIFF: only its first frame is coded
        print(f"m2t encode: warning: {args.input}: {note}", file=sys.stderr)
    return rgb


def _encode_to_target(args) -> int:
    """encode --target-bpp / --target-psnr: the quality of a variable-rate --model, or the model
    of a ladder, that meets the target (rate_control)."""
    from . import rate_control
    from .refine import RefineError

    if args.quality is not None:
        raise CliError("--quality and a target exclude each other: the target chooses the quality")
    try:
        target = rate_control.Target(bpp=args.target_bpp, psnr=args.target_psnr)
        if args.model is not None:
            if args.ladder is not None:
                raise CliError("--model and --ladder exclude each other")
            model = _model(args.model, _device(args.device))
            if not model.rate_levels:
                raise CliError(f"--model {args.model} has one rate: a target chooses the quality of a variable-rate "
                               "model, or a model of a ladder (--ladder)")
        else:
            ladder = rate_control.load_ladder(args.ladder.split(",") if args.ladder else None, _device(args.device))
    except ValueError as exc:
        raise CliError(str(exc)) from None
    rgb = _load_input(args)
    t0 = time.perf_counter()
    try:
        if args.model is not None:
            result = rate_control.encode_at_quality(rgb, target, model, max_pixels=args.max_pixels,
                                                    refine_steps=args.refine)
        else:
            result = rate_control.encode_to_target(rgb, target, ladder, max_pixels=args.max_pixels,
                                                   format_version=args.format_version, refine_steps=args.refine)
    except RefineError as exc:  # --refine with an MT model, or one that does not record its lambda
        raise CliError(str(exc)) from None
    elapsed = time.perf_counter() - t0
    Path(args.output).write_bytes(result.encoded.bitstream)
    h, w = rgb.shape[:2]
    tried = ", ".join((f"quality {t.quality:g}" if t.quality is not None else t.model_id) + f" {t.bpp:.4f} bpp"
                      + (f" {t.psnr:.2f} dB" if t.psnr is not None else "") for t in result.trials)
    quality = f", PSNR {result.psnr:.2f} dB" if result.psnr is not None else ""
    chosen = result.model_id + (f" at quality {result.quality:g}" if result.quality is not None else "")
    print(f"{args.input} -> {args.output}: {w}x{h}, {len(result.encoded.bitstream)} bytes, "
          f"{result.encoded.bpp:.4f} bpp{quality}, model {chosen} for target {target.describe()} "
          f"(tried: {tried}), {elapsed:.2f} s (start-up {_startup(t0):.2f} s: torch, models)")
    if not result.met:
        where = "quality of the model" if result.quality is not None else "model of the ladder"
        print(f"m2t encode: warning: {args.input}: no {where} meets {target.describe()}; "
              f"wrote the closest, {chosen}", file=sys.stderr)
    return 0


def cmd_decode(args) -> int:
    from .bitstream import read_header
    from .decoder import Decoder
    from .image_io import save_image

    preview = args.steps is not None or args.bytes is not None
    if args.steps is not None and args.steps < 0 or args.bytes is not None and args.bytes < 0:
        raise CliError("--steps and --bytes must be >= 0")
    # --bytes N reads only the first N bytes of the file (as a ranged read would).
    data = _read_bitstream(args.input, limit=args.bytes)
    header = read_header(data, max_pixels=args.max_pixels, prefix=preview)
    if args.model:  # the user's choice: a registry name or a checkpoint path
        model = _model(args.model, _device(args.device))
    else:  # the header only selects among installed models (name + weights hash), never a file
        from .registry import load_model_for_header

        model = load_model_for_header(header, device=_device(args.device))
    t0 = time.perf_counter()
    decoder = Decoder(model, max_pixels=args.max_pixels)
    if preview:
        result = decoder.preview(data, steps=args.steps)
        rgb = result.image
        what = (f"preview of {result.steps}/{result.num_steps} steps from {result.bytes_read} of "
                f"{result.total_bytes} bytes")
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rgb = decoder.decompress(data)
        what = "; ".join(str(w.message) for w in caught) or "full"
    elapsed = time.perf_counter() - t0
    save_image(rgb, args.output)
    print(f"{args.input} -> {args.output}: {header.width}x{header.height}, model {header.model_id}, {what}, "
          f"{elapsed:.2f} s (start-up {_startup(t0):.2f} s: torch, model)")
    return 0


_VERSION_NOTES = {
    3: "m2t 0.3: exact integer entropy model",
    4: "exact integer entropy model and synthesis (integer-v1): the same pixels on any machine",
    5: "exact integer entropy model and synthesis (integer-v2, 8-bit weights): the same pixels on any machine",
    6: "format 5 of a variable-rate model, with the quality it was coded at",
    7: "exact integer entropy model on 8-bit weights and synthesis (integer-v2): the same pixels on any machine",
}


def cmd_info(args) -> int:
    from .bitstream import FLAG_ADAPTIVE_ORDER, FLAG_CUDA, read_header
    from .registry import MODEL_NAME_RE

    data = _read_bitstream(args.input)
    h = read_header(data, max_pixels=args.max_pixels, prefix=True)
    pad_b, pad_r = h.padding
    fields = [
        ("format version", f"{h.version} ({_VERSION_NOTES.get(h.version, 'unknown')})"),
        ("model", h.model_id if MODEL_NAME_RE.match(h.model_id) else f"{h.model_id!r} (not a valid model name)"),
        ("weights hash", h.weights_hash.hex()),
        *([("quality", f"{h.quality_value:g}")] if h.quality is not None else []),
        ("image size", f"{h.width}x{h.height}"),
        ("padding", f"bottom {pad_b}, right {pad_r}"),
        ("progressive", f"{h.num_steps} steps in {h.num_chunks} chunk(s); the first K steps are the "
                        f"first bytes: {', '.join(f'{k + 1}: {e}' for k, e in enumerate(h.step_ends))}"),
        ("order", "confidence-adaptive (MT)" if h.flags & FLAG_ADAPTIVE_ORDER else "fixed schedule"),
        ("held", f"{h.steps_in(len(data))} of {h.num_steps} steps" + ("" if len(data) >= h.step_ends[-1]
                                                                   else " (a cut stream: a preview source)")),
        ("encoded on", "CUDA" if h.flags & FLAG_CUDA else "CPU"),
        ("payload", f"{h.payload_len} bytes"),
        ("total size", f"{len(data)} bytes"),
        ("bpp", f"{8 * len(data) / (h.width * h.height):.4f}"),
        ("latent crc32", f"{h.latent_crc:08x}"),
    ]
    width = max(len(k) for k, _ in fields)
    for k, v in fields:
        print(f"{k:<{width}}  {v}")
    return 0


def cmd_models(args) -> int:
    from .registry import DECODE_ONLY_VERSION, DEFAULT_MODEL, list_models, list_previous_models, read_checkpoint_version

    models = list_models()
    if not models:
        print("no models installed (set M2T_MODEL_PATH or train one: m2t train ...)")
        return 0
    for m in models:
        kodak = m.info.get("kodak", {})
        figures = (f"kodak {kodak['bpp']:.3f} bpp {kodak['psnr']:.2f} dB" if "bpp" in kodak
                   else "kodak not measured")
        default = "  (default)" if m.name == DEFAULT_MODEL else ""
        rates = f"  variable rate: --quality 1..{len(m.config.rate_lambdas)}" if m.config.rate_lambdas else ""
        print(f"{m.name}  {m.config.mode}  {m.size_bytes / 1e6:.1f} MB  {figures}{rates}{default}")
    if args.previous:
        for m in list_previous_models():
            part = ", decode-only" if read_checkpoint_version(m.path) == DECODE_ONLY_VERSION else ""
            print(f"{m.name}  {m.config.mode}  {m.size_bytes / 1e6:.1f} MB  replaced: decodes the streams it wrote{part}")
    return 0


# The codec's commands, in the order `m2t --help` lists them: name -> handler(args) -> exit code.
CODEC_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "encode": cmd_encode,
    "decode": cmd_decode,
    "info": cmd_info,
    "models": cmd_models,
}


def _read_bitstream(path: str, limit: int | None = None) -> bytes:
    p = Path(path)
    size = p.stat().st_size
    if size > 1 << 31:
        raise CliError(f"{path}: {size} bytes is too large for a single-image bitstream")
    with p.open("rb") as f:
        return f.read() if limit is None else f.read(limit)


def new_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The `m2t` top-level parser (--version) and its (empty) subcommand set."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="m2t", description="M2T learned image compression")
    parser.add_argument("--version", action="version", version=f"m2t {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    return parser, sub


def add_codec_commands(sub: argparse._SubParsersAction) -> None:
    """Add encode, decode, info and models to `sub`; each sets `func` (its CODEC_COMMANDS handler)."""
    # Pure Python: `m2t --version` stays quick.
    from .bitstream import FORMAT_VERSION, QUALITY_VERSION, WRITABLE_VERSIONS

    def common(p, model_help):
        p.add_argument("--model", default=None, help=model_help)
        p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
        p.add_argument("--max-pixels", type=int, default=64_000_000, help="refuse larger images")

    p = sub.add_parser("encode", help="compress an image file to an .m2t bitstream")
    p.add_argument("input")
    p.add_argument("output")
    common(p, "registry name or checkpoint path (default: the shipped default model)")
    p.add_argument("--psnr", action="store_true", help="also print the PSNR of the reconstruction")
    p.add_argument("--adaptive-order", action="store_true",
                   help="MT models: choose each step's positions by the model's confidence (MaskGIT)")
    p.add_argument("--format-version", type=int, choices=WRITABLE_VERSIONS, default=None,
                   help=f"bitstream format: {FORMAT_VERSION} (default), 5 for decoders of m2t 0.6-0.7 (the same "
                        "latent and pixels, coded by the 16-bit entropy model: about 12%% slower to decode), or 4 "
                        "for m2t 0.4-0.5 (decoded with the integer-v1 synthesis: a little slower, 0.46%% fewer "
                        f"bits at equal PSNR); variable-rate models write {QUALITY_VERSION}")
    p.add_argument("--quality", type=float, default=None, metavar="Q",
                   help="a variable-rate model's quality, 1 (fewest bits) to its number of rate levels, in steps "
                        "of 1/256 (default: its middle level; `m2t models` lists the range)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--target-bpp", type=float, default=None, metavar="BPP",
                        help="the best quality of a variable-rate --model (or model of the ladder) whose stream "
                             "is at most BPP bits per pixel")
    target.add_argument("--target-psnr", type=float, default=None, metavar="DB",
                        help="the cheapest quality of a variable-rate --model (or model of the ladder) whose "
                             "decoded image reaches DB dB PSNR")
    p.add_argument("--refine", type=int, default=0, metavar="STEPS",
                   help="refine the latent in STEPS gradient steps on the model's own rate-distortion objective "
                        "before coding (a slower encoder: fewer bits and a higher PSNR for the same decoder and "
                        "format; 40 is what docs/models.md measures, each step costing about four plain encodes "
                        "on a CPU; default 0: off)")
    p.add_argument("--ladder", default=None, metavar="NAMES",
                   help="with a target: comma-separated models to choose from, ordered by their training "
                        "lambda (default m2t-small-q1,...,q4)")
    p.set_defaults(func=CODEC_COMMANDS["encode"])

    p = sub.add_parser("decode", help="decompress an .m2t bitstream to an image file")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--steps", type=int, default=None, metavar="K",
                   help="preview: decode the first K coding steps, predict the rest (format 3)")
    p.add_argument("--bytes", type=int, default=None, metavar="N",
                   help="preview from the first N bytes of the file: as many complete steps as fit")
    common(p, "override the model named in the header (its weights hash must still match)")
    p.set_defaults(func=CODEC_COMMANDS["decode"])

    p = sub.add_parser("info", help="print a bitstream's header")
    p.add_argument("input")
    p.add_argument("--max-pixels", type=int, default=64_000_000)
    p.set_defaults(func=CODEC_COMMANDS["info"])

    p = sub.add_parser("models", help="list the installed models")
    p.add_argument("--previous", action="store_true",
                   help="also the replaced weights kept for old streams (<name>@<weights hash>)")
    p.set_defaults(func=CODEC_COMMANDS["models"])


def build_parser() -> argparse.ArgumentParser:
    """The codec-only `m2t` parser: encode, decode, info, models."""
    parser, sub = new_parser()
    add_codec_commands(sub)
    return parser


def run_command(command: str, call: Callable[[], int]) -> int:
    """Run one subcommand under the CLI's error policy: an error prints one line to stderr
    and returns EXIT_ERROR (M2T_DEBUG=1: the traceback instead); Ctrl-C returns 130."""
    try:
        return call()
    except KeyboardInterrupt:
        print("m2t: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (m2t info x.m2t | head -1): nothing to report
        _drop_stdout()
        return EXIT_BROKEN_PIPE
    except Exception as exc:  # one clear line, no traceback
        if os.environ.get("M2T_DEBUG"):
            raise
        print(f"m2t {command}: error: {_describe(exc)}", file=sys.stderr)
        return EXIT_ERROR


def main(argv: list[str] | None = None) -> int:
    """The codec commands alone (`python -m m2t_core.cli`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    return run_command(args.command, lambda: args.func(args))


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so that flushing what is still buffered for a closed pipe
    (at exit) raises nothing more."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real stdout (an embedding): nothing buffered there
        pass


def _describe(exc: Exception) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"no such file: {exc.filename}"
    if isinstance(exc, IsADirectoryError):
        return f"is a directory: {exc.filename}"
    if isinstance(exc, PermissionError):
        return f"permission denied: {exc.filename}"
    text = str(exc) or type(exc).__name__
    if isinstance(exc, KeyError):
        text = f"missing key {text}"
    return text.splitlines()[0]


def exit_process(code: int, command: str | None) -> NoReturn:
    """End the `m2t` process with `code`. After a codec command, skip the interpreter's
    teardown: with torch loaded it takes 0.4-0.7 s (its modules' and the model's clean-up),
    a third of a one-image decode's wall time on a 2-core VM. Only where nothing is left to
    clean up: the command's outputs are closed by then, Ray was never imported (its exit
    handlers stop a local cluster), and no other Python thread runs (pool threads join at exit)."""
    if command in CODEC_COMMANDS and "ray" not in sys.modules and threading.active_count() == 1:
        logging.shutdown()  # flush every log handler, as the normal exit does
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe (m2t info | head) or stream: nothing to keep
                pass
        os._exit(code)
    sys.exit(code)


def console() -> NoReturn:
    """`python -m m2t_core.cli`: main(), then exit_process."""
    argv = sys.argv[1:]
    exit_process(main(argv), argv[0] if argv else None)


if __name__ == "__main__":
    console()
