"""pipeline/training/select_model.py: the "ship only if it improves on val" step.

The ladder and candidates are random-init `tiny-test` models (configs/models/tiny-test.yaml),
installed in a temporary M2T_MODEL_PATH folder; val is a few generated PNGs. Random-init
models of one seed form a curve whose PSNR rises with bpp as g_a's last layer is scaled up
(larger latents); a model of another seed sits at a clearly higher PSNR (6.19 vs 6.16 dB):
the "better" candidate. Every run is in-process through `main` (exit codes and messages as
the command gives them)."""

from __future__ import annotations

import datetime as dt
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file

from _models import build_model, random_image
import m2t_core
from m2t_core import Encoder, registry
from m2t_core.config import load_model_config
from pipeline.training import select_model as S

REPO = Path(__file__).resolve().parent.parent
LADDER = "tiny-q1,tiny-q2,tiny-q3"
INFO = {"hardware": "1 x Test GPU", "steps": 1200, "batch_size": 8, "wall_time_s": 5400.0}


def tiny_config():
    return load_model_config(REPO / "configs" / "models" / "tiny-test.yaml")


def save(path: Path, model_id: str, seed: int, scale: float, config=None, info=None) -> Path:
    model = build_model(config or tiny_config(), seed=seed, model_id=model_id, init_scale=scale)
    return registry.save_checkpoint(model, path, model_id, info=info)


def png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def campaign(tmp_path, monkeypatch):
    """(weights folder on M2T_MODEL_PATH holding tiny-q1..q3, val folder, work folder)."""
    weights = tmp_path / "weights"
    for name, scale in (("tiny-q1", 4), ("tiny-q2", 16), ("tiny-q3", 32)):
        save(weights / f"{name}.safetensors", name, seed=0, scale=scale)
    monkeypatch.setenv("M2T_MODEL_PATH", str(weights))
    val = tmp_path / "val"
    (val / "sub").mkdir(parents=True)
    (val / "a.png").write_bytes(png(random_image(64, 80, seed=0)))
    (val / "sub" / "b.png").write_bytes(png(random_image(80, 64, seed=1)))
    (val / "sub" / "tall.png").write_bytes(png(random_image(530, 48, seed=2)))  # cropped to 512 rows
    (val / "notes.txt").write_text("not an image")
    work = tmp_path / "work"
    work.mkdir()
    return weights, val, work


def run(capsys, *argv) -> tuple[int, str, str]:
    code = S.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------- end to end


def test_cli_evaluates_logs_caches_and_ships(campaign, capsys):
    weights, val, work = campaign
    candidate = save(work / "cand.safetensors", "tiny-q2", seed=1, scale=8, info=INFO)
    log = work / "models.md"
    log.write_text("# Models\n\nSome text.\n")
    common = [candidate, "--ladder", LADDER, "--val", val, "--cache", work / "cache", "--threads", 1]

    code, out, err = run(capsys, *common, "--json", work / "first.json")
    assert code == 0, err
    first = json.loads((work / "first.json").read_text())
    assert first["evaluated"] == ["tiny-q1@val", "tiny-q2@val", "tiny-q3@val", "candidate@val"]
    assert first["val"]["replaces"] == "tiny-q2" and first["val"]["images"] == 3
    assert {r["key"]: (r["height"], r["width"]) for r in first["val"]["candidate"]["per_image"]} == {
        "a.png": (64, 80), "sub/b.png": (80, 64), "sub/tall.png": (512, 48)}
    assert first["val"]["bd_rate"]["value"] < S.SHIP_BELOW_PERCENT and first["ship"] and not first["shipped"]
    assert "would ship" in out and "images/s" in out and "replaces tiny-q2" in out
    assert registry.read_metadata(weights / "tiny-q2.safetensors")[2] == {}  # nothing installed yet
    ladder_files = [p for p in (work / "cache").glob("*.json")
                    if json.loads(p.read_text())["key"]["weights_digest"] != first["candidate"]["weights_digest"]]
    assert len(ladder_files) == 3
    stamps = {p: p.stat().st_mtime_ns for p in ladder_files}

    old_bytes = (weights / "tiny-q2.safetensors").read_bytes()
    rgb = random_image(48, 64, seed=5)
    old = Encoder(registry.load_model("tiny-q2", cache=False), reconstruct=True).encode_image(rgb)
    code, out, err = run(capsys, *common, "--ship", "--log", log, "--json", work / "second.json")
    assert code == 0, err
    # The replaced weights are kept where the registry finds them for the streams they wrote.
    [kept] = (weights / "previous").glob("tiny-q2@*.safetensors")  # decode-only: all but g_a, byte for byte
    assert registry.read_checkpoint_version(kept) == registry.DECODE_ONLY_VERSION and "kept the replaced weights" in out
    old_tensors = {k: t for k, t in load_bytes(old_bytes).items() if not k.startswith("g_a.")}
    assert load_file(str(kept)).keys() == old_tensors.keys() and len(old_tensors) < len(load_bytes(old_bytes))
    assert all(torch.equal(t, old_tensors[k]) for k, t in load_file(str(kept)).items())
    assert [m.name for m in registry.list_models() if m.name.startswith("tiny")] == ["tiny-q1", "tiny-q2", "tiny-q3"]
    assert np.array_equal(m2t_core.decompress(old.bitstream), old.x_hat)  # found by name and weights hash
    second = json.loads((work / "second.json").read_text())
    assert second["evaluated"] == ["candidate@val"]  # the ladder came from the cache
    assert {p: p.stat().st_mtime_ns for p in ladder_files} == stamps  # not rewritten
    assert {n: second["val"]["ladder"][n]["bpp"] for n in ("tiny-q1", "tiny-q2", "tiny-q3")} == \
        {n: first["val"]["ladder"][n]["bpp"] for n in ("tiny-q1", "tiny-q2", "tiny-q3")}
    assert second["shipped"] and "shipped to" in out
    installed = weights / "tiny-q2.safetensors"  # the candidate, with the decision in its metadata
    assert load_file(str(installed)).keys() == load_file(str(candidate)).keys()
    assert all(torch.equal(t, load_file(str(candidate))[k]) for k, t in load_file(str(installed)).items())
    selected = registry.read_metadata(installed)[2]["selected"]
    assert selected["val_bd_rate_percent"] == round(second["val"]["bd_rate"]["value"], 3)
    assert selected["replaces"] == kept.stem and selected["val_images"] >= 1 and selected["kodak_bd_rate_percent"] is None
    assert not list(weights.glob(".*tmp"))
    text = log.read_text()
    assert text.startswith("# Models\n\nSome text.\n\n## Training campaign log\n\n| date (UTC) | model |")
    row = text.splitlines()[-1]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:] == ["`tiny-q2`", "1 x Test GPU", "1,200", "9,600", "1.50",
                         S.format_percent(second["val"]["bd_rate"]["value"]), "-", "yes"]


def test_identical_candidate_and_extra_point(campaign, capsys):
    weights, val, work = campaign
    same = work / "same.safetensors"
    shutil.copyfile(weights / "tiny-q3.safetensors", same)
    common = ["--ladder", LADDER, "--val", val, "--cache", work / "c"]
    code, out, err = run(capsys, same, *common, "--json", work / "s.json")
    assert code == 0, err
    report = json.loads((work / "s.json").read_text())
    assert abs(report["val"]["bd_rate"]["value"]) < 1e-9 and not report["ship"]
    assert report["val"]["delta"] == {"bpp": 0.0, "bpp_percent": 0.0, "psnr_db": 0.0}
    assert "would not ship" in out

    extra = save(work / "tiny-q5.safetensors", "tiny-q5", seed=0, scale=8)
    code, out, err = run(capsys, extra, *common, "--json", work / "e.json")
    assert code == 0, err
    report = json.loads((work / "e.json").read_text())
    assert report["val"]["replaces"] is None and len(report["val"]["test"]["bpp"]) == 4
    assert report["evaluated"] == ["candidate@val"]
    assert "not in the ladder: judged as an extra point" in out


def test_ship_refuses_another_architecture(campaign, capsys):
    weights, val, work = campaign
    before = (weights / "tiny-q2.safetensors").read_bytes()
    other = save(work / "wide.safetensors", "tiny-q2", seed=1, scale=8, config=tiny_config().replace(d_mlp=32))
    code, _, err = run(capsys, other, "--ladder", LADDER, "--val", val, "--cache", work / "cache", "--ship")
    assert code == 2
    assert "architecture" in err and "d_mlp: 64 -> 32" in err and str(other) in err
    assert (weights / "tiny-q2.safetensors").read_bytes() == before
    assert not (work / "cache").exists()  # refused before any coding


def test_bad_inputs_exit_2_naming_them(campaign, capsys, tmp_path):
    weights, val, work = campaign
    missing = tmp_path / "nowhere" / "cand.safetensors"
    code, _, err = run(capsys, missing, "--ladder", LADDER, "--val", val)
    assert code == 2 and str(missing) in err and "not found" in err

    garbage = work / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint")
    code, _, err = run(capsys, garbage, "--ladder", LADDER, "--val", val)
    assert code == 2 and str(garbage) in err

    code, _, err = run(capsys, weights / "tiny-q1.safetensors", "--ladder", "tiny-q1,no-such-model", "--val", val)
    assert code == 2 and "no-such-model" in err

    code, _, err = run(capsys, weights / "tiny-q1.safetensors", "--ladder", LADDER, "--val", work / "empty")
    assert code == 2 and str(work / "empty") in err


def test_dataset_digest_follows_the_bytes(campaign):
    _, val, _ = campaign
    before = S.load_dataset("val", val, S.VAL_MAX_SIDE)
    (val / "a.png").write_bytes(png(random_image(64, 80, seed=7)))
    after = S.load_dataset("val", val, S.VAL_MAX_SIDE)
    assert before.digest != after.digest
    assert S.cache_file(Path("c"), S.cache_key("m", "d", before)) != \
        S.cache_file(Path("c"), S.cache_key("m", "d", after))
    assert S.load_dataset("kodak", val, None).crop_rule == "full"


# ---------------------------------------------------------------- the decision


LADDER_POINTS = {"q1": {"bpp": 0.12, "psnr": 28.0}, "q2": {"bpp": 0.27, "psnr": 29.6},
                 "q3": {"bpp": 0.54, "psnr": 31.3}, "q4": {"bpp": 0.88, "psnr": 32.0}}


def test_decision_on_synthetic_curves():
    better = S.compare(LADDER_POINTS, "q2", {"bpp": 0.25, "psnr": 29.6})
    assert better["bd_rate"]["value"] < -0.05 and better["ship"] and better["replaces"] == "q2"
    assert better["delta"]["bpp"] == pytest.approx(-0.02) and better["delta"]["psnr_db"] == 0.0

    worse = S.compare(LADDER_POINTS, "q2", {"bpp": 0.29, "psnr": 29.6})
    assert worse["bd_rate"]["value"] > 0 and not worse["ship"]

    same = S.compare(LADDER_POINTS, "q3", dict(LADDER_POINTS["q3"]))
    assert same["bd_rate"]["value"] == pytest.approx(0.0, abs=1e-9) and not same["ship"]

    inexact = S.compare(LADDER_POINTS, "q2", {"bpp": 0.25, "psnr": 29.6}, bit_exact=False)
    assert not inexact["ship"] and "bit-exactly" in inexact["reason"]

    unmeasured = S.compare(LADDER_POINTS, "q2", None, bit_exact=False)
    assert not unmeasured["ship"] and unmeasured["bd_rate"]["value"] is None


def test_a_candidate_that_dominates_its_member_ships_whatever_pchip_says():
    """The q4 round of 2026-12-06 on val: fewer bits and +0.54 dB against the q4 it would
    replace, yet the ladder's PCHIP BD-rate +1.03 % (the slope at q3 changes, which bends the
    q2-q3 segment). A dominating point is better at every PSNR of the piecewise-linear ladder:
    it ships; a point better in one and worse in the other still goes by the BD-rate."""
    ladder = {"q1": {"bpp": 0.1157, "psnr": 29.17}, "q2": {"bpp": 0.2504, "psnr": 30.94},
              "q3": {"bpp": 0.4849, "psnr": 32.75}, "q4": {"bpp": 0.8104, "psnr": 32.98}}
    top = S.compare(ladder, "q4", {"bpp": 0.8082, "psnr": 33.52})
    assert top["bd_rate"]["value"] > 0 and top["ship"] and "dominates" in top["reason"]
    trade = S.compare(ladder, "q4", {"bpp": 0.8200, "psnr": 33.52})  # more bits, more PSNR
    assert "dominates" not in trade["reason"]
    tiny = S.compare(ladder, "q4", {"bpp": 0.8104, "psnr": 32.985})  # within the margins: not worth a release
    assert not tiny["ship"]
    assert not S.compare(ladder, "q4", {"bpp": 0.8082, "psnr": 33.52}, bit_exact=False)["ship"]
    assert S.dominates({"bpp_percent": -0.06, "psnr_db": 0.0}) and S.dominates({"bpp_percent": 0.0, "psnr_db": 0.01})
    assert not S.dominates({"bpp_percent": -5.0, "psnr_db": -0.001})
    assert not S.dominates({"bpp_percent": 0.001, "psnr_db": 1.0})


def test_decide_threshold_is_strict():
    assert S.decide(S.SHIP_BELOW_PERCENT, True) == (False, "BD-rate -0.050 % is not below -0.05 %")
    assert S.decide(S.SHIP_BELOW_PERCENT - 1e-6, True)[0]
    assert not S.decide(-5.0, False)[0]
    assert not S.decide(None, True)[0]


def test_extra_point_curves():
    anchor, test, replaced = S.ladder_curves(LADDER_POINTS, "q5", {"bpp": 1.2, "psnr": 33.0})
    assert replaced is None and anchor["bpp"] == [0.12, 0.27, 0.54, 0.88] and test["bpp"][-1] == 1.2
    anchor, test, replaced = S.ladder_curves(LADDER_POINTS, "q1", {"bpp": 0.10, "psnr": 28.0})
    assert replaced == "q1" and test["bpp"] == [0.10, 0.27, 0.54, 0.88]


# ---------------------------------------------------------------- the campaign log


ROW = S.log_row("m2t-small-q3", INFO, -1.234, None, False, now=dt.datetime(2025, 1, 2, 3, 4, tzinfo=dt.timezone.utc))


def test_log_row_cells():
    assert ROW == ["2025-01-02 03:04", "`m2t-small-q3`", "1 x Test GPU", "1,200", "9,600", "1.50", "-1.234 %", "-",
                   "no"]
    assert S.log_row("x", {}, None, 0.5, True)[2:] == ["-", "-", "-", "-", "-", "+0.500 %", "yes"]


def test_log_appends_under_heading_keeping_the_rest():
    header = S.table_line(S.LOG_COLUMNS) + S.table_line(["---"] * len(S.LOG_COLUMNS))
    old_row = S.table_line(["2024-12-01 00:00", "`a`", "-", "-", "-", "-", "+1.00 %", "-", "no"])
    text = ("# Shipped models\n\n| model | bpp |\n|---|---|\n| q1 | 0.1 |\n\n"
            f"{S.LOG_HEADING}\n\nOne row per run.\n\n{header}{old_row}\n## Replacing them\n\n| x |\n|---|\n")
    got = S.add_log_row(text, ROW)
    assert got == text.replace(old_row, old_row + S.table_line(ROW))

    no_table = "# M\n\n" + S.LOG_HEADING + "\n## Next\ntext\n"
    assert S.add_log_row(no_table, ROW) == \
        "# M\n\n" + S.LOG_HEADING + "\n\n" + header + S.table_line(ROW) + "\n## Next\ntext\n"

    assert S.add_log_row("# M\nlast line", ROW) == f"# M\nlast line\n\n{S.LOG_HEADING}\n\n{header}{S.table_line(ROW)}"
    assert S.add_log_row("", ROW) == f"{S.LOG_HEADING}\n\n{header}{S.table_line(ROW)}"


def test_append_log_twice(tmp_path):
    path = tmp_path / "log.md"
    path.write_text("intro\n")
    path.chmod(0o640)
    S.append_log(path, ROW)
    S.append_log(path, ROW)
    lines = path.read_text().splitlines()
    assert lines[:3] == ["intro", "", S.LOG_HEADING] and lines[-2:] == [S.table_line(ROW).rstrip("\n")] * 2
    assert path.stat().st_mode & 0o777 == 0o640 and not list(tmp_path.glob(".*"))


def test_updating_checkpoint_info_rewrites_only_what_changes(tmp_path):
    """A stamp of figures the file holds already (bench/kodak_rd.py --stamp of an unchanged
    model) leaves the file byte for byte; new figures are merged in, the tensors unchanged."""
    path = save(tmp_path / "m.safetensors", "m", seed=0, scale=1.0)
    figures = {"bpp": 0.1275, "psnr": 26.645, "images": 24}
    assert registry.update_checkpoint_info(path, {"kodak": figures})
    stamped, inode = path.read_bytes(), path.stat().st_ino
    assert registry.read_metadata(path)[2]["kodak"] == figures
    assert not registry.update_checkpoint_info(path, {"kodak": dict(figures)})
    assert path.read_bytes() == stamped and path.stat().st_ino == inode  # not even replaced by a copy
    assert registry.update_checkpoint_info(path, {"kodak": {**figures, "psnr": 26.7}})
    assert registry.read_metadata(path)[2]["kodak"]["psnr"] == 26.7
    assert load_file(str(path)).keys() == load_bytes(stamped).keys()
    for k, t in load_file(str(path)).items():
        assert torch.equal(t, load_bytes(stamped)[k])
