"""Latent refinement (m2t_core/refine.py): a refined stream is an ordinary stream (it decodes
to the encoder's reconstruction), refinement lowers the model's own objective, and the
pieces it runs in (bands of windows, g_s's tiles) add up to the whole image's gradient."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from m2t_core import Decoder, Encoder, ModelConfig, refine, registry, tiling
from m2t_core.model import M2TCodec
from _models import build_model, random_image, tiny_config, tiny_model


def _with_lambda(model: M2TCodec, lmbda: float = 0.01) -> M2TCodec:
    model = copy.deepcopy(model)
    model.rd_lambda = lmbda
    return model


def _real_loss(model: M2TCodec, rgb: np.ndarray, y_hat: torch.Tensor) -> float:
    """bits per pixel + lambda x MSE (0..255) of the real stream of y_hat, decoded."""
    encoded = Encoder(model).encode_latent(y_hat, *rgb.shape[:2])
    out = Decoder(model).decompress(encoded.bitstream)
    return encoded.bpp + model.rd_lambda * float(np.mean((out.astype(np.float64) - rgb) ** 2))


def test_refined_streams_decode_to_the_encoders_reconstruction():
    model = _with_lambda(tiny_model())
    rgb = random_image(96, 160, seed=3)
    plain = Encoder(model, reconstruct=True).encode_image(rgb)
    refined = Encoder(model, reconstruct=True, refine_steps=10).encode_image(rgb)
    assert not torch.equal(plain.y_hat, refined.y_hat)  # the refinement moved the latent
    _, y_hat = Decoder(model).decode_latent(refined.bitstream)
    assert torch.equal(y_hat.to(torch.int32), refined.y_hat)
    assert np.array_equal(Decoder(model).decompress(refined.bitstream), refined.x_hat)


def test_refinement_lowers_the_real_streams_objective():
    # A random-init model: its g_s barely follows the latent, so steps must be long to move it.
    model = _with_lambda(tiny_model(), 1e-3)
    rgb = random_image(96, 160, seed=3)
    y = model.latent(rgb)
    plain = _real_loss(model, rgb, refine.rounded(y))
    refined = _real_loss(model, rgb, refine.rounded(refine.refine_latent(model, rgb, y, 30, lr=0.3)))
    assert refined < plain - 0.1  # 17.95 -> 17.73 here


def test_mt_models_are_refused():
    model = _with_lambda(tiny_model("mt"))
    rgb = random_image(64, 64)
    with pytest.raises(refine.RefineError, match="MT model"):
        Encoder(model, refine_steps=5)
    with pytest.raises(refine.RefineError, match="MT model"):
        refine.refine_latent(model, rgb, model.latent(rgb), 5, lmbda=0.01)


def test_no_steps_is_the_plain_latent_and_a_refinement_repeats():
    model = _with_lambda(tiny_model())
    rgb = random_image(64, 64, seed=1)
    y = model.latent(rgb)
    assert torch.equal(refine.refine_latent(model, rgb, y, 0), y)
    a, b = (refine.refine_latent(model, rgb, y, 3) for _ in range(2))
    assert torch.equal(a, b)  # the noise comes from a seeded generator
    assert not torch.equal(refine.refine_latent(model, rgb, y, 3, seed=1), a)


def test_bands_and_tiles_add_up_to_the_whole_gradient():
    model = _with_lambda(tiny_model())
    rgb = random_image(312, 440, seed=2)  # 20 x 28 latents: 3 x 4 windows of 8, the last ones cut
    y = model.latent(rgb).clone()

    def gradient() -> torch.Tensor:
        with torch.inference_mode(False), torch.enable_grad():
            objective = refine._Objective(model, rgb, model.rd_lambda, None, seed=0)
            return objective.gradient(y.clone())

    whole = gradient()
    margin = tiling.plan_for(model.g_s, 1.0).margin  # g_s's receptive field: the core pixels are exact
    with tiling.forced_plan(tiling.TilePlan(tile=5, margin=margin)):
        assert len(tiling.synthesis_tiles(model.g_s, *y.shape[-2:])) == 24
        tiled = gradient()
    saved = refine.WINDOW_COLUMNS
    refine.WINDOW_COLUMNS = 1
    try:
        banded = gradient()
    finally:
        refine.WINDOW_COLUMNS = saved
    scale = float(whole.abs().max())
    assert scale > 0
    assert float((tiled - whole).abs().max()) <= 1e-4 * scale
    assert float((banded - whole).abs().max()) <= 1e-4 * scale


def test_a_variable_rate_model_refines_at_its_quality():
    cfg = tiny_config(rate_lambdas=(0.002, 0.02, 0.2))
    model = build_model(cfg, seed=4)
    rgb = random_image(64, 96, seed=5)
    assert refine.model_lambda(model, 2 * 256) == pytest.approx(0.02)
    assert refine.model_lambda(model, 256 + 128) == pytest.approx(math.sqrt(0.002 * 0.02))
    encoded = Encoder(model, reconstruct=True, quality=2.5, refine_steps=5).encode_image(rgb)
    assert np.array_equal(Decoder(model).decompress(encoded.bitstream), encoded.x_hat)
    from m2t_core import rate_control

    result = rate_control.encode_at_quality(rgb, rate_control.Target(bpp=8.0), model, step=0.5, refine_steps=3)
    assert result.quality is not None and Decoder(model).decompress(result.encoded.bitstream).shape == (64, 96, 3)


def test_a_model_without_its_lambda_is_refused_before_any_image():
    model = tiny_model()
    assert model.rd_lambda is None
    with pytest.raises(ValueError, match="does not record the lambda"):
        Encoder(model, refine_steps=5)
    with pytest.raises(ValueError, match="refine_steps"):
        Encoder(_with_lambda(model), refine_steps=-1)
    with pytest.raises(ValueError, match="latent"):
        refine.refine_latent(_with_lambda(model), random_image(64, 64), torch.zeros(16, 5, 4), 1)


def test_checkpoints_carry_their_lambda(tmp_path):
    model = build_model(ModelConfig(**{**tiny_config().to_dict(), "mode": "m2t"}))
    path = registry.save_checkpoint(model, tmp_path / "tiny.safetensors", info={"lambda": 0.025})
    assert registry.load_checkpoint(path).rd_lambda == 0.025
    assert registry.load_model("m2t-small-q3").rd_lambda == 0.025
    for bad in (None, "0.1", True, -1.0, 0.0, float("nan"), float("inf")):
        assert registry.trained_lambda({} if bad is None else {"lambda": bad}) is None


def _image_file(path, height: int = 48, width: int = 64, seed: int = 0):
    from PIL import Image

    Image.fromarray(random_image(height, width, seed=seed)).save(path)
    return path


def test_the_cli_refines_and_refuses_what_it_cannot(tmp_path):
    from m2t_core.cli import main

    src = _image_file(tmp_path / "in.png")
    out = tmp_path / "out.m2t"
    assert main(["encode", str(src), str(out), "--model", "m2t-small-q1", "--refine", "2", "--psnr"]) == 0
    plain = tmp_path / "plain.m2t"
    assert main(["encode", str(src), str(plain), "--model", "m2t-small-q1"]) == 0
    assert out.read_bytes() != plain.read_bytes()
    model = registry.load_model("m2t-small-q1")
    assert Decoder(model).decompress(out.read_bytes()).shape == (48, 64, 3)
    assert main(["encode", str(src), str(out), "--target-psnr", "20", "--refine", "2"]) == 0
    assert main(["encode", str(src), str(out), "--refine", "-1"]) == 2
    untrained = registry.save_checkpoint(tiny_model(), tmp_path / "tiny.safetensors")  # no lambda recorded
    assert main(["encode", str(src), str(out), "--model", str(untrained), "--refine", "2"]) == 2


def test_the_compress_job_refines_records_it_and_resumes_only_alike(tmp_path):
    from pipeline.jobs import compress as C
    from pipeline.storage import archive as A

    src = tmp_path / "in"
    src.mkdir()
    for i in range(2):
        _image_file(src / f"{i}.png", seed=i)
    ckpt = registry.save_checkpoint(tiny_model(), tmp_path / "tiny.safetensors", info={"lambda": 0.01})
    out = tmp_path / "out.m2t"
    base = [str(src), str(out), "--model", str(ckpt), "--no-ray", "--no-progress", "--set", "torch_threads=1"]
    assert C.main(base + ["--set", "refine_steps=2"]) == C.EXIT_OK
    stats = A.Archive(str(out), {}).completed_shards()
    assert stats and all(s["settings"]["refine_steps"] == 2 for s in stats.values())
    assert C.main(base) == C.EXIT_USAGE  # the archive was written with refinement: resume with it or --overwrite
    assert C.main(base + ["--set", "refine_steps=2"]) == C.EXIT_OK
    untrained = registry.save_checkpoint(tiny_model(), tmp_path / "untrained.safetensors")
    assert C.main([str(src), str(tmp_path / "other.m2t"), "--model", str(untrained), "--no-ray", "--no-progress",
                   "--set", "refine_steps=2"]) == C.EXIT_USAGE
    assert C.main(base + ["--set", "refine_steps=-1"]) == C.EXIT_USAGE


def test_the_evaluation_names_refined_curves_and_checks_the_setting(tmp_path):
    from m2t_core.config import ConfigError
    from pipeline.evaluation import evaluate as E

    [plain] = E.resolve_models("m2t-small-q1", {})
    [refined] = E.resolve_models("m2t-small-q1", {}, refine_steps=40)
    assert (plain["family"], refined["family"]) == ("m2t-small", "m2t-small-refine40")
    with pytest.raises(ConfigError, match="refine_steps"):
        E.EvalConfig(refine_steps=-1)
    untrained = registry.save_checkpoint(tiny_model(), tmp_path / "tiny.safetensors")
    with pytest.raises(ConfigError, match="does not record the lambda"):
        E.resolve_models(str(untrained), {}, refine_steps=2)
    with pytest.raises(ConfigError, match="MT model"):
        E.resolve_models("mt-small-q2", {}, refine_steps=2)


def test_the_library_call_refines():
    import m2t_core

    model = _with_lambda(tiny_model())
    rgb = random_image(64, 64, seed=7)
    [plain] = m2t_core.compress(rgb, model=model)
    [refined] = m2t_core.compress(rgb, model=model, refine_steps=5)
    assert refined != plain
    assert m2t_core.decompress(refined, model=model).shape == (64, 64, 3)
