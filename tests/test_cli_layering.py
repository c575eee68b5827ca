"""The CLI sits above both packages: m2t_core keeps no knowledge of pipeline/.

The `m2t` program is pipeline/cli.py (the codec's commands from m2t_core/cli.py plus the
pipeline's); m2t_core must never import pipeline, and `m2t encode` must not import Ray.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORE = REPO / "m2t_core"


def _is_pipeline(name: str | None) -> bool:
    return bool(name) and (name == "pipeline" or name.startswith("pipeline."))


def _dynamic_import_target(node: ast.Call) -> str | None:
    """The module name of importlib.import_module("...") / __import__("...") / import_module("...")."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name not in ("import_module", "__import__", "find_spec") or not node.args:
        return None
    arg = node.args[0]
    return arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None


def test_m2t_core_source_never_imports_pipeline():
    files = sorted(CORE.rglob("*.py"))
    assert CORE / "cli.py" in files
    offences = []
    for path in files:
        text = path.read_text()
        rel = path.relative_to(REPO)
        for n, line in enumerate(text.splitlines(), 1):
            if re.match(r"\s*(import\s+pipeline\b|from\s+pipeline\b)", line):
                offences.append(f"{rel}:{n}: {line.strip()}")
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, ast.Import):
                offences += [f"{rel}:{node.lineno}: import {a.name}" for a in node.names if _is_pipeline(a.name)]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and _is_pipeline(node.module):
                offences.append(f"{rel}:{node.lineno}: from {node.module} import ...")
            elif isinstance(node, ast.Call) and _is_pipeline(_dynamic_import_target(node)):
                offences.append(f"{rel}:{node.lineno}: dynamic import of {_dynamic_import_target(node)!r}")
    assert not offences, "m2t_core must not import pipeline:\n" + "\n".join(offences)
    cli = (CORE / "cli.py").read_text()
    assert "PIPELINE_COMMANDS" not in cli and "importlib" not in cli and "pipeline" not in cli.lower()


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_importing_the_codec_loads_no_pipeline_module():
    out = _run("import m2t_core, m2t_core.cli, m2t_core.encoder, m2t_core.decoder; import sys; "
               "bad = [m for m in sys.modules if m == 'pipeline' or m.startswith('pipeline.')]; "
               "assert not bad, bad")
    assert out.returncode == 0, out.stderr[-2000:]


def test_codec_commands_through_the_program_do_not_import_ray():
    # A codec command dispatched by the full program: an error path (exit 2), no model loaded.
    out = _run("import sys; from pipeline.cli import main; "
               "assert main(['info', 'no-such-file.m2t']) == 2; "
               "bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'pyarrow', 'fsspec')]; "
               "assert not bad, bad[:5]")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "m2t info: error: no such file: no-such-file.m2t" in out.stderr


def test_program_help_lists_codec_and_pipeline_commands():
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-2000:]
    for command in ("encode", "decode", "info", "models", "train", "compress", "get", "verify", "restore",
                    "eval", "browse"):
        assert re.search(rf"^\s+{command}\s", out.stdout, re.M), (command, out.stdout)


def test_codec_only_program_lists_only_codec_commands():
    from m2t_core.cli import CODEC_COMMANDS, build_parser

    assert list(CODEC_COMMANDS) == ["encode", "decode", "info", "models"]
    help_text = build_parser().format_help()
    assert "{encode,decode,info,models}" in help_text, help_text
    assert not re.search(r"^\s+(train|compress|get|verify|restore|eval|browse)\s", help_text, re.M), help_text


def test_full_program_routes_pipeline_commands_to_their_own_parsers(capsys):
    from pipeline.cli import PIPELINE_COMMANDS, main

    assert list(PIPELINE_COMMANDS) == ["train", "compress", "get", "verify", "restore", "eval", "browse"]
    with pytest.raises(SystemExit) as exc:
        main(["get", "--help"])
    assert exc.value.code == 0 and "usage:" in capsys.readouterr().out
    assert main(["info", "no-such-file.m2t"]) == 2
    assert capsys.readouterr().err.strip() == "m2t info: error: no such file: no-such-file.m2t"


def test_quick_commands_do_not_import_torch(tmp_path):
    """`m2t --version`, `m2t models` and `m2t info` read metadata and headers only: they import
    neither torch nor the pipeline's heavy packages, so they start in a fraction of a second
    (start-up time itself is a benchmark figure, not a test)."""
    golden = REPO / "tests" / "data" / "golden-v4-m2t-small-q1.m2t"
    for argv in (["--version"], ["models"], ["info", str(golden)]):
        out = _run("import sys; from pipeline.cli import main\n"
                   "try:\n    code = main(%r)\nexcept SystemExit as exc:\n    code = exc.code\n"
                   "assert code in (0, None), code\n"
                   "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'ray', 'pyarrow', 'fsspec')]\n"
                   "assert not bad, bad[:5]" % (argv,))
        assert out.returncode == 0, (argv, out.stderr[-2000:])


def test_the_console_script_skips_teardown_after_codec_commands_only(tmp_path):
    """`m2t` (pipeline.cli:console) ends a codec command with os._exit after flushing (the
    interpreter's teardown with torch loaded takes 0.4-0.7 s): the output is complete, the
    exit code is the command's, and a file the command wrote is whole. Atexit handlers do not
    run after a codec command; after a pipeline command they do (Ray's need them)."""
    golden = REPO / "tests" / "data" / "golden-v5-m2t-small-q1.m2t"
    out_png = tmp_path / "decoded.png"
    probe = ("import atexit, sys; atexit.register(lambda: print('teardown ran', flush=True)); "
             "from pipeline.cli import console; sys.argv = ['m2t'] + sys.argv[1:]; console()")

    def console(*argv):
        return subprocess.run([sys.executable, "-c", probe, *argv], cwd=REPO, capture_output=True, text=True,
                              timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})

    decoded = console("decode", str(golden), str(out_png))
    assert decoded.returncode == 0, decoded.stderr[-2000:]
    assert "144x96" in decoded.stdout and "teardown ran" not in decoded.stdout
    from PIL import Image

    assert Image.open(out_png).size == (144, 96)
    info = console("info", str(golden))
    assert info.returncode == 0 and "format version  5" in info.stdout and "teardown ran" not in info.stdout
    failed = console("decode", "no-such-file.m2t", str(out_png))
    assert failed.returncode == 2 and "no such file" in failed.stderr and "teardown ran" not in failed.stdout
    pipeline = console("get", "no-such-archive", "key", str(tmp_path / "x.png"))
    assert pipeline.returncode != 0 and "teardown ran" in pipeline.stdout


def test_output_into_a_closed_pipe_ends_quietly():
    """`m2t info x.m2t | head -1`: the reader leaves after one line; the command ends with 141
    (128 + SIGPIPE, as a shell reports it) and prints no error."""
    golden = REPO / "tests" / "data" / "golden-v5-m2t-small-q1.m2t"
    code = ("import os, sys\n"
            "r, w = os.pipe()\n"
            "os.close(r)\n"  # no reader at all: the first flush fails
            "os.dup2(w, 1)\n"
            "from pipeline.cli import console\n"
            "sys.argv = ['m2t', 'info', %r]\n"
            "console()\n" % str(golden))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 141, (out.returncode, out.stderr[-2000:])
    assert out.stderr == "", out.stderr[-2000:]


def test_encode_writes_format_4_on_request(tmp_path):
    """`m2t encode --format-version 4` writes what m2t 0.4-0.5 decode; other versions are refused."""
    from m2t_core import Encoder
    from m2t_core.bitstream import read_header
    from m2t_core.cli import main
    from PIL import Image

    sys.path.insert(0, str(REPO / "tests"))
    from golden_image import golden_image

    src = tmp_path / "in.png"
    Image.fromarray(golden_image()).save(src)
    assert main(["encode", str(src), str(tmp_path / "v4.m2t"), "--model", "m2t-small-q1", "--format-version", "4"]) == 0
    assert read_header((tmp_path / "v4.m2t").read_bytes()).version == 4
    with pytest.raises(SystemExit):
        main(["encode", str(src), str(tmp_path / "v3.m2t"), "--format-version", "3"])
    from m2t_core import load_model

    with pytest.raises(ValueError, match="format_version"):
        Encoder(load_model("m2t-small-q1"), format_version=3)


def test_info_describes_every_readable_format():
    """`m2t info` names what each format it reads is: a new version gets its line."""
    from m2t_core import bitstream, cli

    assert sorted(cli._VERSION_NOTES) == sorted(bitstream.READABLE_VERSIONS)
