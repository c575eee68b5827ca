"""The `m2t` command line: one program, subcommands.

    m2t encode IN.png OUT.m2t [--model NAME_OR_PATH]
    m2t decode IN.m2t OUT.png
    m2t info IN.m2t
    m2t models
    m2t train --config configs/train/NAME.yaml [--set key=value ...]
    m2t compress INPUT_URL OUTPUT_URL [--model NAME] [--config F] [--set key=value ...]
    m2t get ARCHIVE KEY OUT.png
    m2t verify ARCHIVE_URL [--shards ...] [--against-source]
    m2t restore ARCHIVE_URL OUTPUT_URL [--format png] [--keys ...]
    m2t eval --data URL [URL ...] [--models all] [--baselines jpeg,webp,avif,jpeg2000,jxl] [--anchor jpeg] OUTPUT_URL
    m2t browse ARCHIVE_URL

The CLI sits above both packages: the codec's commands (encode, decode, info, models) and its
error policy come from m2t_core/cli.py, which knows nothing of this package; the dataset
commands below are this package's. Each pipeline module is imported only when its command
runs, so `m2t encode` never imports Ray or pyarrow.

Errors print one line to stderr (no traceback; M2T_DEBUG=1 shows it). The codec's commands
exit with status 2; the pipeline's exit with their error's code by its type (pipeline/errors.py:
2 usage, 3 incomplete), Ctrl-C outside a job's run with 130.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, NoReturn

from m2t_core import cli as codec_cli
from m2t_core.cli import EXIT_ERROR, CliError  # noqa: F401  (re-exported: the codec commands' error policy)

from pipeline.errors import UsageError, run_main

Command = Callable[[list[str]], int]


# The pipeline's subcommands parse their own arguments; their errors' types choose the exit code.
# name -> (module of this package, its entry point, help), in the order `m2t --help` lists
# them (after the codec's commands); a module is imported only when its command runs.
PIPELINE_COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("training.trainer", "main", "train a model (see configs/train/)"),
    "compress": ("jobs.compress", "main", "compress a dataset into an archive (Ray)"),
    "get": ("storage.archive", "get_main", "decode one image of an archive by key"),
    "verify": ("jobs.verify", "verify_main", "decode a whole archive and check every checksum (Ray)"),
    "restore": ("jobs.verify", "restore_main", "write an archive's images back to files (Ray)"),
    "eval": ("evaluation.evaluate", "main", "rate-distortion of models and classic codecs over datasets (Ray)"),
    "browse": ("browse.server", "main", "a local web page to browse an archive's images (previews from stream prefixes)"),
}


def run_pipeline_command(command: str, rest: list[str]) -> int:
    module, entry, _ = PIPELINE_COMMANDS[command]
    try:
        func: Command = getattr(importlib.import_module(f".{module}", __package__), entry)
    except ImportError as exc:
        raise UsageError(f"'{command}' needs the pipeline extras (pip install -e '.[pipeline]'): {exc}") from None
    return func(rest)


def build_parser() -> argparse.ArgumentParser:
    """The full `m2t` parser: the codec's commands, then the pipeline's (listed for --help;
    `main` hands their arguments to the command's own parser)."""
    parser, sub = codec_cli.new_parser()
    codec_cli.add_codec_commands(sub)
    for name, (_, _, help_text) in PIPELINE_COMMANDS.items():
        sub.add_parser(name, help=help_text + f" (m2t {name} --help)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] in PIPELINE_COMMANDS:
        command, rest = argv[0], argv[1:]
        return run_main(f"m2t {command}", lambda: run_pipeline_command(command, rest))
    args = parser.parse_args(argv)
    return codec_cli.run_command(args.command, lambda: args.func(args))


def console() -> NoReturn:
    """The `m2t` console script: main(), then the codec's exit_process (a codec command skips
    the interpreter's teardown; a pipeline command exits normally)."""
    argv = sys.argv[1:]
    codec_cli.exit_process(main(argv), argv[0] if argv else None)


if __name__ == "__main__":
    console()
