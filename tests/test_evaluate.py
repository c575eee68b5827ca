"""The evaluation job (pipeline/evaluation/: evaluate.py, baselines.py, rd.py), for real: the shared
local Ray cluster, real Pillow codecs, a shipped model, real Parquet.

A few small crops of Kodak photographs (168 px high: just enough for MS-SSIM) keep the file
well under a minute on 2 CPU cores. The "failing codec" is WebP on an image wider than WebP's
16383-pixel limit: a real encoder refusing real input, on the production code path.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import cli
from m2t_core.config import ConfigError
from pipeline.evaluation import baselines as B
from pipeline.evaluation import evaluate as E
from pipeline.evaluation import rd

MODEL = "m2t-small-q1"
CROP_H, CROP_W = 168, 200
WIDE = (4, 16400)  # rows, columns: over WebP's 16383-pixel limit, fine for JPEG and our model


def _photos() -> list[Image.Image]:
    """Three real photographs: Kodak's where ../shared is beside the repository, else
    scikit-image's samples (installed with the pipeline extra), so the test never skips."""
    kodak = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "kodak"
    if (kodak / "kodim01.png").is_file():
        return [Image.open(kodak / f"kodim{i:02d}.png").convert("RGB") for i in (1, 5, 23)]
    from skimage import data

    return [Image.fromarray(np.ascontiguousarray(f()[..., :3])) for f in (data.astronaut, data.coffee, data.chelsea)]


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evaldata") / "mini"
    root.mkdir()
    for n, im in enumerate(_photos()):
        im.crop((96, 96, 96 + CROP_W, 96 + CROP_H)).save(root / f"k{n:02d}.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (*WIDE, 3), dtype=np.uint8)).save(root / "wide.png")
    return root


def config(data: Path, out: Path, **changes) -> E.EvalConfig:
    return dataclasses.replace(E.EvalConfig(data=str(data), output=str(out), models=MODEL,
                                            baselines=["webp"], anchor="webp"), **changes)


# ---------------------------------------------------------------- BD-rate


CURVE = {"bpp": [0.12, 0.25, 0.5, 0.9, 1.4], "psnr": [26.1, 28.4, 30.9, 33.2, 35.0]}


def test_bd_rate_of_a_codec_against_itself_is_zero():
    for method in rd.BD_METHODS:
        assert rd.bd_rate(CURVE, CURVE, method=method)["value"] == pytest.approx(0.0, abs=1e-9)
        assert rd.bd_psnr(CURVE, CURVE, method=method)["value"] == pytest.approx(0.0, abs=1e-9)


def test_bd_rate_of_a_known_shift():
    # 20 % fewer bits at every PSNR: log-rate drops by log10(0.8) everywhere, and pchip of
    # (y + c) is pchip(y) + c, so the integral differs by exactly c: -20 % up to rounding.
    cheaper = {"bpp": [b * 0.8 for b in CURVE["bpp"]], "psnr": CURVE["psnr"]}
    result = rd.bd_rate(CURVE, cheaper)
    assert result["value"] == pytest.approx(-20.0, abs=1e-9) and result["note"] is None
    assert rd.bd_rate(cheaper, CURVE)["value"] == pytest.approx(25.0, abs=1e-9)
    # 0.5 dB better at every rate: BD-PSNR +0.5 dB, exactly for the same reason.
    better = {"bpp": CURVE["bpp"], "psnr": [p + 0.5 for p in CURVE["psnr"]]}
    assert rd.bd_psnr(CURVE, better)["value"] == pytest.approx(0.5, abs=1e-9)
    assert rd.bd_rate(CURVE, better)["value"] < 0


def test_bd_rate_without_enough_points_or_overlap_is_none_with_a_reason():
    one = {"bpp": [0.3], "psnr": [29.0]}
    result = rd.bd_rate(CURVE, one)
    assert result["value"] is None and "too few points" in result["note"]
    far = {"bpp": [3.0, 4.0], "psnr": [40.0, 42.0]}
    result = rd.bd_rate(CURVE, far)
    assert result["value"] is None and "no overlap" in result["note"]
    assert rd.bd_psnr(CURVE, far)["value"] is None
    # A point that costs more bits for less quality is dropped, and the note says so.
    wobbly = {"bpp": [0.12, 0.25, 0.3, 0.5], "psnr": [26.1, 28.4, 28.0, 30.9]}
    result = rd.bd_rate(CURVE, wobbly)
    assert result["value"] is not None and "non-monotone" in result["note"]


def test_paper_reference_and_ms_ssim():
    assert rd.PAPER_MT_KODAK["bpp"] == sorted(rd.PAPER_MT_KODAK["bpp"])
    rgb = np.random.default_rng(1).integers(0, 256, (170, 180, 3), dtype=np.uint8)
    assert rd.ms_ssim(rgb, rgb) == pytest.approx(1.0)
    assert rd.ms_ssim(rgb[:160], rgb[:160]) is None  # short side must exceed 160


# ---------------------------------------------------------------- codecs


def test_baseline_names_and_aliases():
    assert B.expand_baselines("jpeg") == ["jpeg-420", "jpeg-444"]
    assert B.expand_baselines("jpeg2000, JPEG") == ["jpeg2000", "jpeg-420", "jpeg-444"]
    # "all" is the Pillow codecs: CompressAI is opt-in by name.
    assert B.expand_baselines("all") == ["jpeg-420", "jpeg-444", "webp", "avif", "jpeg2000", "jxl"]
    assert B.expand_baselines(["compressai", "webp"]) == [
        "compressai-bmshj2018-hyperprior", "compressai-mbt2018", "webp"]
    assert B.expand_baselines("none") == [] and B.expand_baselines(None) == []
    for unknown in (["gif"], "jpeg,mbt2018"):
        with pytest.raises(ValueError, match=r"unknown baseline codec '(gif|mbt2018)' \(known: jpeg-420, .*"
                                             r"compressai-mbt2018, jpeg, j2k, jpegxl, compressai, all, none\)"):
            B.expand_baselines(unknown)
    with pytest.raises(ValueError, match="unknown baseline codec 'jpeg'"):
        B.get_baseline("jpeg")  # an alias is not a codec
    assert B.get_baseline("avif") is B.BASELINES["avif"]


def test_every_pillow_baseline_round_trips_at_both_ends_of_its_sweep():
    rgb = np.asarray(_photos()[0].crop((200, 150, 296, 214)))  # 96x64 of a real photo
    pillow = [b for b in B.BASELINES.values() if isinstance(b, B.PillowBaseline)]
    assert {b.name for b in pillow} == set(B.expand_baselines("all"))
    for codec in pillow:
        assert list(codec.sweep) == sorted(codec.sweep) and len(codec.sweep) >= 5 and codec.kind == "classic"
        codec.ensure_available()
        sizes = []
        for value in (codec.sweep[0], codec.sweep[-1]):
            data = codec.encode(rgb, value)
            decoded = codec.decode(data, 64, 96)
            assert decoded.shape == (64, 96, 3) and decoded.dtype == np.uint8, codec.name
            assert 8 * len(data) / (64 * 96) > 0
            sizes.append(len(data))
        assert sizes[0] < sizes[1], f"{codec.name}: the sweep's top point is not larger than its bottom one"
        with pytest.raises(ValueError, match="decoded image is 96x64, the original 95x64"):
            codec.decode(data, 64, 95)
        described = codec.describe()
        assert described["name"] == codec.name and described["sweep"] == list(codec.sweep)
        assert described["library"].startswith(("Pillow ", "pillow-jxl-plugin "))


def test_a_missing_codec_plugin_names_the_codec_and_the_package():
    missing = dataclasses.replace(B.BASELINES["jxl"], module="m2t_no_such_plugin")
    with pytest.raises(B.CodecUnavailableError, match=r"codec jxl needs the package pillow-jxl-plugin"):
        missing.ensure_available()


def test_compressai_unavailable_names_what_to_install(monkeypatch, small_dataset, tmp_path):
    # CompressAI is not a project dependency: where it cannot be imported (None in sys.modules
    # makes `import compressai` raise ImportError, installed or not), the baseline says so and
    # what to install, and `m2t eval` refuses it as a usage error before any work.
    monkeypatch.setitem(sys.modules, "compressai", None)
    monkeypatch.setattr(B, "_COMPRESSAI", [])  # forget an earlier import's outcome
    codec = B.BASELINES["compressai-mbt2018"]
    assert codec.kind == "learned" and codec.sweep == (1, 2, 3, 4, 5, 6, 7, 8)
    with pytest.raises(B.CodecUnavailableError, match=r"codec compressai-mbt2018 needs CompressAI, which is not "
                                                      r"importable .*pip install --no-deps compressai==1\.2\.8"):
        codec.ensure_available()
    assert codec.describe()["library"] == "compressai (not installed)"
    cfg = config(small_dataset, tmp_path / "o", models="none", baselines="compressai-bmshj2018-hyperprior",
                 anchor="compressai-bmshj2018-hyperprior")
    with pytest.raises(ConfigError, match="needs CompressAI"):
        E.evaluate(cfg, progress=False)
    assert not (tmp_path / "o").exists()


def test_compressai_random_init_round_trip():
    # Runs where CompressAI is installed (make bench-peers); the default suite does not need it.
    module, how = B.import_compressai()
    if module is None:
        pytest.skip(f"CompressAI is {how}")
    rgb = np.asarray(_photos()[0].crop((200, 150, 300, 220)))  # 100x70: padded to 128x128 inside
    codec = B.BASELINES["compressai-bmshj2018-hyperprior"].random_init()
    codec.ensure_available()
    for quality in (1, 8):
        data = codec.encode(rgb, quality)
        decoded = codec.decode(data, 70, 100)
        assert decoded.shape == (70, 100, 3) and decoded.dtype == np.uint8 and data[0] == quality
        assert codec.encode(rgb, quality) == data  # seeded weights: the same bytes every time
    with pytest.raises(ValueError, match="not a stream of this codec"):
        codec.decode(b"\x09" + data[1:], 70, 100)


def test_compressai_pretrained_weights_come_only_from_torch_hubs_cache(monkeypatch, tmp_path):
    # Runs where CompressAI is installed. The zoo would download missing weights: the baseline
    # refuses first, naming the files and the folder; with the files there, the zoo loads them.
    module, how = B.import_compressai()
    if module is None:
        pytest.skip(f"CompressAI is {how}")
    import torch
    from compressai import zoo

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # torch.hub.get_dir() = TORCH_HOME/hub
    codec = dataclasses.replace(B.BASELINES["compressai-bmshj2018-hyperprior"], sweep=(1, 2))  # its own models
    with pytest.raises(B.CodecUnavailableError, match=r"never downloads at run time: put "
                       r"bmshj2018-hyperprior-1-7eb97409\.pth\.tar, bmshj2018-hyperprior-2-93677231\.pth\.tar in "
                       + str(tmp_path / "hub" / "checkpoints")):
        codec.ensure_available()
    rgb = np.asarray(_photos()[0].crop((200, 150, 300, 220)))
    for quality, (path, _url) in codec.weights_files().items():
        # Stand-ins for the published files (this test cannot download them): seeded random
        # weights in the same format, under the same names.
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(quality)
        model = zoo.bmshj2018_hyperprior(quality=quality, pretrained=False)
        model.update(force=True)
        torch.save(model.state_dict(), path)
    codec.ensure_available()
    assert codec.describe()["weights_files"] == [Path(p).name for p, _ in codec.weights_files().values()]
    data = codec.encode(rgb, 2)
    assert codec.decode(data, 70, 100).shape == (70, 100, 3)
    assert data != codec.random_init().encode(rgb, 2)  # the cached weights, not a random init


# ---------------------------------------------------------------- the job


def test_eval_end_to_end_on_ray(ray_cluster, small_dataset, tmp_path):
    out = tmp_path / "eval"
    cfg = config(small_dataset, out, paper_reference=True)
    summary, code = E.evaluate(cfg, progress=False, command="test")
    assert code == E.EXIT_FAILED_ROWS  # WebP refused the wide image: recorded, not fatal
    assert summary["complete"] and summary["this_run"]["runner"]["ray"]

    table = pq.read_table(out / "per_image.parquet").to_pylist()
    webp_points = len(B.BASELINES["webp"].sweep)
    assert len(table) == 4 * (webp_points + 1)
    failed = [r for r in table if r["status"] != "ok"]
    assert {(r["key"], r["codec"]) for r in failed} == {("wide.png", "webp")}
    assert len(failed) == webp_points and all("16383" in r["error"] for r in failed)
    for r in table:
        if r["status"] == "ok":
            assert r["bpp"] == pytest.approx(8 * r["bytes"] / r["pixels"])
            assert r["psnr"] > 8 and r["encode_s"] > 0 and r["decode_s"] > 0
            assert (r["ms_ssim"] is None) == (r["key"] == "wide.png")
    ours = [r for r in table if r["codec"] == "m2t-small"]
    assert len(ours) == 4 and {r["model"] for r in ours} == {MODEL} and all(r["status"] == "ok" for r in ours)

    # Means over the 3 images every codec coded (wide.png is left out of all of them).
    assert summary["results"]["mini"]["excluded_images"] == 1
    doc = json.loads((out / "codecs" / "webp.json").read_text())
    assert set(doc) == {"name", "description", "results"} and doc["name"] == "webp"
    assert set(doc["results"]) == {"psnr-rgb", "ms-ssim-rgb", "bpp", "encoding_time", "decoding_time"}
    assert len(doc["results"]["bpp"]) == webp_points and doc["results"]["bpp"] == sorted(doc["results"]["bpp"])
    webp_k01 = [r["bpp"] for r in table if r["codec"] == "webp" and r["point"] == "q=0" and r["key"] != "wide.png"]
    assert doc["results"]["bpp"][0] == pytest.approx(np.mean(webp_k01))
    bd = summary["results"]["mini"]["bd"]
    assert bd["vs_anchor"]["webp"]["bd_rate"]["value"] == pytest.approx(0.0, abs=1e-9)
    assert bd["vs_anchor"]["m2t-small"]["bd_rate"]["value"] is None  # one model: one point
    assert "too few points" in bd["vs_references"]["m2t-small"][rd.PAPER_MT_LABEL]["bd_rate"]["note"]

    report = (out / "report.md").read_text()
    assert "10 row(s) failed" in report and "mini/wide.png, webp" in report and "rd_psnr.png" in report
    for name in ("rd_psnr.png", "rd_msssim.png", "summary.json"):
        assert (out / name).stat().st_size > 0

    # Resume: nothing is recomputed, the parts are not rewritten.
    parts = {p: p.stat().st_mtime_ns for p in (out / "parts").iterdir()}
    summary, code = E.evaluate(cfg, progress=False, command="test")
    assert code == E.EXIT_FAILED_ROWS and summary["units"]["this_run"] == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "parts").iterdir()} == parts
    assert len(summary["runs"]) == 2


def test_max_units_stops_and_a_rerun_does_only_the_rest(small_dataset, tmp_path):
    out = tmp_path / "eval"
    cfg = config(small_dataset, out, models="none", baselines="jpeg", anchor="jpeg", shard_size=2,
                 ms_ssim=False, max_units=3, ray=E.RayOptions(enabled=False))
    summary, code = E.evaluate(cfg, progress=False)
    assert code == E.EXIT_INCOMPLETE and summary["units"] == {
        "planned": 4, "already_done": 0, "this_run": 3, "failed": {}, "remaining": 1, "stale_parts_ignored": 0}
    assert not (out / "report.md").exists() and (out / "summary.json").exists()
    first = {p: p.stat().st_mtime_ns for p in (out / "parts").iterdir()}
    summary, code = E.evaluate(dataclasses.replace(cfg, max_units=0), progress=False)
    assert code == E.EXIT_OK and summary["units"]["this_run"] == 1 and summary["units"]["already_done"] == 3
    assert all(p.stat().st_mtime_ns == t for p, t in first.items())
    assert summary["rows"]["total"] == 4 * (len(B.BASELINES["jpeg-420"].sweep) + len(B.BASELINES["jpeg-444"].sweep))
    # Other settings make other parts: the old ones are ignored, not merged.
    cfg2 = dataclasses.replace(cfg, max_units=0, ms_ssim=True, baselines="jpeg-420")
    summary, code = E.evaluate(cfg2, progress=False)
    assert summary["units"]["this_run"] == 2 and summary["units"]["stale_parts_ignored"] == 4


def test_cli_usage_errors_exit_2(small_dataset, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert cli.main(["eval", "--data", str(small_dataset), "--baselines", "gif", out]) == 2
    assert "unknown baseline codec 'gif'" in capsys.readouterr().err
    assert cli.main(["eval", "--data", str(small_dataset), "--models", "none", "--baselines", "webp",
                     "--anchor", "jpeg", out]) == 2
    assert "anchor 'jpeg' is not among the evaluated codecs" in capsys.readouterr().err
    assert cli.main(["eval", out]) == 2
    assert "no data" in capsys.readouterr().err
    assert cli.main(["eval", "--data", str(tmp_path / "missing"), out, "--no-ray"]) == 2
    assert "input not found" in capsys.readouterr().err
    # --data A OUT: the last URL is the output. An input over max_pixels is a failed row (exit 1).
    code = cli.main(["eval", "--models", "none", "--baselines", "jpeg-420", "--anchor", "jpeg", "--no-ray",
                     "--no-progress", "--set", "ms_ssim=false", "--set", "max_pixels=50000",
                     "--data", str(small_dataset), out])
    printed = capsys.readouterr().out
    assert code == 1 and "mini: 4 images (1 left out of the means" in printed
    report = (tmp_path / "o" / "report.md").read_text()
    assert "Inputs that could not be read" in report and "mini/wide.png" in report
