"""Per-image targets over the shipped ladder (m2t_core/rate_control.py, `m2t encode
--target-bpp / --target-psnr`): the search picks what trying every model would pick, an
unreachable target gets the closest model and says so, and the stream decodes as any other."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import m2t_core
from m2t_core import rate_control as RC
from m2t_core.encoder import Encoder
from m2t_core.metrics import psnr

from golden_image import golden_image

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ladder():
    return RC.load_ladder()


@pytest.fixture(scope="module")
def image_and_rungs(ladder):
    """A test image and every ladder model's (bpp, PSNR) on it, by trying them all."""
    rgb = golden_image(64, 96)
    rungs = []
    for model in ladder:
        encoded = Encoder(model, reconstruct=True).encode_image(rgb)
        rungs.append((encoded.bpp, psnr(rgb, encoded.x_hat)))
    return rgb, rungs


def test_the_default_ladder_is_the_shipped_m2t_models_by_rate(ladder, image_and_rungs):
    assert [m.model_id for m in ladder] == list(RC.DEFAULT_LADDER)
    _, rungs = image_and_rungs
    assert all(a[0] < b[0] and a[1] < b[1] for a, b in zip(rungs, rungs[1:]))  # what bisection assumes here
    reversed_order = RC.load_ladder(list(reversed(RC.DEFAULT_LADDER)))
    assert [m.model_id for m in reversed_order] == list(RC.DEFAULT_LADDER)  # ordered by lambda, not by argument


def test_a_psnr_target_gets_the_cheapest_model_that_reaches_it(ladder, image_and_rungs):
    rgb, rungs = image_and_rungs
    for i, (_, quality) in enumerate(rungs):
        for target, want in ((quality - 0.01, i), (quality + 0.01, i + 1)):
            result = RC.encode_to_target(rgb, RC.Target(psnr=target), ladder)
            if want == len(ladder):  # beyond the top model: the top one, not met
                assert result.model_id == ladder[-1].model_id and not result.met
                continue
            assert result.model_id == ladder[want].model_id and result.met, (target, result.trials)
            assert result.psnr >= target and len(result.trials) <= math.ceil(math.log2(len(ladder) + 1))
            decoded = m2t_core.decompress(result.encoded.bitstream)
            assert m2t_core.read_header(result.encoded.bitstream).model_id == ladder[want].model_id
            assert psnr(rgb, decoded) == result.psnr  # the decoder's own pixels were measured


def test_a_bpp_target_gets_the_best_model_within_it(ladder, image_and_rungs):
    rgb, rungs = image_and_rungs
    for i, (bpp, _) in enumerate(rungs):
        for target, want in ((bpp + 1e-4, i), (bpp - 1e-4, i - 1)):
            result = RC.encode_to_target(rgb, RC.Target(bpp=target), ladder)
            if want < 0:  # below the bottom model: the bottom one, not met
                assert result.model_id == ladder[0].model_id and not result.met
                continue
            assert result.model_id == ladder[want].model_id and result.met, (target, result.trials)
            assert result.encoded.bpp <= target and result.psnr is None  # no reconstruction needed


@pytest.mark.parametrize("kwargs", [{}, {"bpp": 0.5, "psnr": 30.0}, {"bpp": -1.0}, {"psnr": 0.0},
                                    {"psnr": float("nan")}, {"bpp": float("inf")}, {"psnr": 250.0}])
def test_targets_are_checked(kwargs):
    with pytest.raises(ValueError):
        RC.Target(**kwargs)


def test_a_ladder_needs_distinct_training_lambdas():
    with pytest.raises(ValueError, match="share a training lambda"):
        RC.load_ladder(["m2t-small-q2", "mt-small-q2"])


def test_the_cli_writes_the_chosen_stream_and_warns_when_out_of_reach(tmp_path):
    src = tmp_path / "in.png"
    Image.fromarray(golden_image(48, 64)).save(src)
    out = tmp_path / "out.m2t"
    cli = [sys.executable, "-m", "m2t_core.cli", "encode", str(src), str(out)]
    run = subprocess.run(cli + ["--target-psnr", "99"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "no model of the ladder meets >= 99 dB PSNR" in run.stderr
    assert m2t_core.read_header(out.read_bytes()).model_id == RC.DEFAULT_LADDER[-1]
    for extra in (["--target-psnr", "30", "--model", "m2t-small-q1"], ["--ladder", "m2t-small-q1"],
                  ["--target-bpp", "0"]):
        run = subprocess.run(cli + extra, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert run.returncode == 2 and "m2t encode: error:" in run.stderr, (extra, run.stderr)
    assert np.asarray(Image.open(src)).shape == (48, 64, 3)
