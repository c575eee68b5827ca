"""Variable rate (m2t_core/rate.py, format 6): one model codes at any quality Q in [1, K].

What must hold: the integer rate arithmetic is what its definition says on every machine;
a stream decodes to the encoder's reconstruction at every quality, alone and in batches of
mixed qualities; the quality lives in the header and a wrong one never decodes silently; a
variable-rate model at a level whose gain is 1 codes exactly like the fixed-rate model it
started from; rate control finds the quality for a target; the trainer and the CLI take it."""

from __future__ import annotations

import hashlib
import math
import struct
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from m2t_core import Decoder, Encoder, exact as X, network as N, rate as R, rate_control as RC, registry
from m2t_core import bitstream as bs
from m2t_core.config import ConfigError, ModelConfig, load_model_config
from m2t_core.metrics import psnr
from m2t_core.model import M2TCodec
from pipeline.training.checkpoints import copy_weights

from golden_image import golden_image

REPO = Path(__file__).resolve().parent.parent
LAMBDAS = (0.002, 0.02, 0.2)  # the middle level's gain starts at 1


def _tiny(rate_lambdas=LAMBDAS, seed: int = 0) -> M2TCodec:
    torch.manual_seed(seed)
    cfg = load_model_config(REPO / "configs/models/tiny-test.yaml").replace(rate_lambdas=rate_lambdas)
    return M2TCodec(cfg, model_id="tiny-vr" if rate_lambdas else "tiny").eval()


@pytest.fixture(scope="module")
def model() -> M2TCodec:
    m = _tiny()
    with torch.no_grad():  # levels that differ per channel, and a rate embedding that matters
        m.entropy_model.log2_gain.add_(torch.linspace(-0.3, 0.3, m.cfg.C))
        m.entropy_model.rate_embed.normal_(0, 0.5)
    return m


# ---------------------------------------------------------------------- the integer arithmetic


def test_pow2_table_is_the_floor_of_its_definition():
    table = R.pow2_table()
    for j, r in enumerate(table.tolist()):
        target = 1 << (j + (R.POW2_BITS << R.LOG2_FRAC_BITS))
        assert r ** 256 <= target < (r + 1) ** 256
    assert table[0] == 1 << R.POW2_BITS


def test_rate_tables_are_pinned():
    """Built by integer-only code: a platform that builds them otherwise is caught here."""
    digest = hashlib.sha256(R.pow2_table().astype("<i8").tobytes() + R.level_offsets().astype("<i8").tobytes())
    assert digest.hexdigest()[:16] == "45ba1e86700faca8"


def test_level_offsets_follow_the_coders_scale_levels():
    from m2t_core.entropy_coding import LOG_SCALE_STEP

    offsets = R.level_offsets()
    for v in (-R.LOG2_LIMIT, -1000, -129, -1, 0, 1, 128, 256, 1777, R.LOG2_LIMIT):
        want = v / 256 * math.log(2) / LOG_SCALE_STEP
        assert abs(offsets[v + R.LOG2_LIMIT] - want) <= 0.5 + 1e-9
    assert (np.diff(offsets) >= 0).all()


def test_scale_pow2_is_round_half_up_of_the_exact_product():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-(1 << 16), (1 << 16) + 1, (4000,), generator=g)
    v = torch.randint(-R.LOG2_LIMIT, R.LOG2_LIMIT + 1, (4000,), generator=g)
    for exponent in (0, 4, 12):
        got = R.scale_pow2(x, v, exponent)
        table = R.pow2_table()
        for xi, vi, gi in zip(x.tolist()[:600], v.tolist()[:600], got.tolist()[:600]):
            m = Fraction(int(table[vi % 256]), 1 << R.POW2_BITS) * Fraction(2) ** (vi // 256 + exponent)
            assert gi == math.floor(xi * m + Fraction(1, 2))
    with pytest.raises(ValueError, match="rounding bit"):
        R.scale_pow2(x, v, 23)


def test_interpolation_hits_the_levels_and_floors_between():
    table = torch.tensor([[0, 100, -7], [256, -100, 9], [1000, 0, 9]])
    codes = torch.tensor([256, 512, 768, 384, 640, 257])
    got = R.interpolate(table, codes)
    assert got[:3].tolist() == table.tolist()
    assert got[3].tolist() == [128, 0, 1] and got[4].tolist() == [628, -50, 9]
    assert got[5].tolist() == [1, 99, -7]  # floor((100 * 255 - 100) / 256) = 99
    quality = torch.tensor([1.0, 2.0, 3.0, 1.5])
    assert torch.allclose(R.interpolate_float(table.double(), quality), got[[0, 1, 2, 3]].double(), atol=0.5)


def test_quality_codes_and_their_range():
    assert R.quality_code(1, 3) == 256 and R.quality_code(2.5, 3) == 640 and R.quality_code(3.0, 3) == 768
    for bad in (0.99, 3.01, float("nan"), "2", True):
        with pytest.raises(R.QualityError):
            R.quality_code(bad, 3)
    with pytest.raises(R.QualityError, match="one rate"):
        R.quality_code(1.0, 0)


def test_config_checks_the_lambdas():
    for bad in ((0.1,), (0.1, 0.1), (0.2, 0.1), (0.0, 0.1), ("a", 0.1)):
        with pytest.raises(ConfigError, match="rate_lambdas"):
            ModelConfig(rate_lambdas=bad)
    assert "rate_lambdas" not in ModelConfig().to_dict()  # a fixed-rate model's identity is unchanged
    assert ModelConfig.from_dict({"rate_lambdas": [0.01, 0.1]}).rate_lambdas == (0.01, 0.1)


# ---------------------------------------------------------------------- the exact entropy model


def test_int64_and_float64_arithmetic_agree_with_rates(model):
    g = torch.Generator().manual_seed(2)
    L, C = model.cfg.tokens_per_window, model.cfg.C
    tokens = torch.randint(-40, 41, (5, L, C), generator=g).to(torch.int32)
    rate = model.exact_rate(torch.tensor([256, 300, 512, 700, 768]))
    a = N.m2t_teacher_forced(X.IntOps(model.exact, rate), tokens)
    b = N.m2t_teacher_forced(X.Float64Ops(model.exact, rate), tokens)
    for f in ("mean_q", "level", "logit_q"):
        assert torch.equal(getattr(a, f), getattr(b, f).to(getattr(a, f).dtype))
    # One window at a time gives the same integers as the batch.
    one = N.m2t_teacher_forced(X.Float64Ops(model.exact, rate.rows(3, 4)), tokens[3:4])
    assert torch.equal(one.mean_q, b.mean_q[3:4]) and torch.equal(one.level, b.level[3:4])
    with pytest.raises(ValueError, match="qualities"):
        X.Float64Ops(model.exact)


# ---------------------------------------------------------------------- streams


@pytest.mark.parametrize("quality", [1.0, 1.37, 2.0, 2.5, 3.0])
def test_streams_decode_to_the_encoders_reconstruction(model, quality):
    rgb = golden_image(70, 90)
    encoded = Encoder(model, quality=quality, reconstruct=True).encode_image(rgb)
    header = bs.read_header(encoded.bitstream)
    assert header.version == bs.QUALITY_VERSION and header.quality == round(quality * 256)
    assert np.array_equal(Decoder(model).decompress(encoded.bitstream), encoded.x_hat)


@pytest.mark.parametrize("adaptive", [False, True])
def test_a_variable_rate_mt_model_round_trips(adaptive):
    torch.manual_seed(4)
    cfg = load_model_config(REPO / "configs/models/tiny-test.yaml").replace(mode="mt", rate_lambdas=LAMBDAS)
    mt = M2TCodec(cfg, model_id="tiny-vr-mt").eval()
    rgb = golden_image(64, 80)
    for quality in (1.25, 3.0):
        encoded = Encoder(mt, quality=quality, reconstruct=True, adaptive_order=adaptive).encode_image(rgb)
        assert np.array_equal(Decoder(mt).decompress(encoded.bitstream), encoded.x_hat)


def test_rate_grows_with_quality(model):
    rgb = golden_image(64, 128)
    sizes = [len(Encoder(model, quality=q).encode_image(rgb).bitstream) for q in (1.0, 2.0, 3.0)]
    assert sizes[0] < sizes[1] < sizes[2]


def test_a_batch_of_mixed_qualities_decodes_each_exactly(model):
    images = [golden_image(64, 64), golden_image(80, 48), golden_image(64, 64)]
    streams, singles = [], []
    for rgb, q in zip(images, (1.2, 2.9, 2.0)):
        streams.append(Encoder(model, quality=q).encode_image(rgb).bitstream)
        singles.append(Decoder(model).decompress(streams[-1]))
    batched = Decoder(model, batch_images=3, windows_per_pass=64).decompress_many(streams + [b"junk"])
    assert all(np.array_equal(a, b) for a, b in zip(batched, singles))
    assert isinstance(batched[-1], bs.BitstreamError)
    encoder = Encoder(model, batch_images=3, windows_per_pass=64)
    again = [e.bitstream for e in encoder.encode(images)]
    assert again[0] == Encoder(model).encode_image(images[0]).bitstream  # the default quality: level 2
    per_image = [encoder.encode_image(rgb, quality=q).bitstream for rgb, q in zip(images, (1.2, 2.9, 2.0))]
    assert per_image == streams


def _patch_quality(stream: bytes, code: int) -> bytes:
    at = 7 + stream[6]
    body = bytearray(stream)
    struct.pack_into("<H", body, at, code)
    header_len = bs.read_header(stream).size
    import zlib

    struct.pack_into("<I", body, header_len - 4, zlib.crc32(bytes(body[:header_len - 4])))
    return bytes(body)


def test_a_wrong_quality_never_decodes(model):
    stream = Encoder(model, quality=2.0).encode_image(golden_image(64, 64)).bitstream
    for code in (255, 769, 0):  # out of the model's range
        with pytest.raises(bs.BitstreamError, match="quality"):
            Decoder(model).decompress(_patch_quality(stream, code))
    with pytest.raises(bs.BitstreamError):  # in range, but not what coded it: the checks catch it
        Decoder(model).decompress(_patch_quality(stream, 600))
    relabelled = bytearray(stream)
    relabelled[4] = 5  # a format-5 reader would read the quality as the weights hash: refused
    with pytest.raises(bs.BitstreamError):
        Decoder(model).decompress(bytes(relabelled))


def test_fixed_and_variable_rate_keep_to_their_formats(model):
    fixed = _tiny(())
    with pytest.raises(R.QualityError, match="one rate"):
        Encoder(fixed, quality=2.0)
    with pytest.raises(ValueError, match="format 6"):
        Encoder(model, format_version=5)
    with pytest.raises(ValueError, match="fixed-rate"):
        Encoder(fixed, format_version=6)
    assert bs.read_header(Encoder(fixed).encode_image(golden_image(64, 64)).bitstream).quality is None


def test_the_middle_level_of_a_warm_start_codes_like_the_fixed_rate_model():
    """Gains of 1 and a zero rate embedding: the same integers, so the same payload and pixels
    as the fixed-rate model's format 5 (format 6 is format 5 and the quality)."""
    fixed = _tiny((), seed=3)
    variable = M2TCodec(fixed.cfg.replace(rate_lambdas=LAMBDAS), model_id="tiny").eval()
    copy_weights(variable, fixed)
    assert int(variable.exact.rate_log2_gain[1].abs().max()) == 0
    rgb = golden_image(96, 80)
    a = Encoder(fixed, format_version=5, reconstruct=True).encode_image(rgb)
    b = Encoder(variable, quality=2.0, reconstruct=True).encode_image(rgb)
    ha, hb = bs.unpack(a.bitstream), bs.unpack(b.bitstream)
    assert ha[1] == hb[1] and np.array_equal(a.x_hat, b.x_hat) and torch.equal(a.y_hat, b.y_hat)
    with pytest.raises(ValueError, match="architectures differ"):
        copy_weights(fixed, variable)


def test_a_checkpoint_keeps_the_rate_tables(model, tmp_path):
    path = registry.save_checkpoint(model, tmp_path / "tiny-vr.safetensors", float_entropy_model=False)
    loaded = registry.load_checkpoint(path)
    assert loaded.cfg.rate_lambdas == LAMBDAS
    assert torch.equal(loaded.exact.rate_log2_gain, model.exact.rate_log2_gain)
    assert torch.equal(loaded.exact.rate_embed, model.exact.rate_embed)
    stream = Encoder(model, quality=1.6).encode_image(golden_image(64, 64)).bitstream
    assert loaded.weights_hash(6) == model.weights_hash(6)
    assert np.array_equal(Decoder(loaded).decompress(stream), Decoder(model).decompress(stream))


# ---------------------------------------------------------------------- rate control


def test_rate_control_finds_the_quality_for_a_target(model):
    rgb = golden_image(64, 96)
    by_quality = {q: Encoder(model, quality=q, reconstruct=True).encode_image(rgb) for q in (1.5, 2.5)}
    budget = by_quality[2.5].bpp
    result = RC.encode_at_quality(rgb, RC.Target(bpp=budget), model)
    assert result.met and result.encoded.bpp <= budget and result.quality >= 2.5 - RC.QUALITY_STEP
    assert len(result.trials) <= math.ceil(math.log2(2 * 16 + 2)) + 1
    assert np.array_equal(Decoder(model).decompress(result.encoded.bitstream),
                          Encoder(model, quality=result.quality, reconstruct=True).encode_image(rgb).x_hat)
    goal = psnr(rgb, by_quality[1.5].x_hat)
    result = RC.encode_at_quality(rgb, RC.Target(psnr=goal), model)
    assert result.met and result.psnr >= goal and result.quality <= 1.5
    unreachable = RC.encode_at_quality(rgb, RC.Target(bpp=1e-4), model)
    assert not unreachable.met and unreachable.quality == 1.0
    with pytest.raises(ValueError, match="one rate"):
        RC.encode_at_quality(rgb, RC.Target(bpp=1.0), _tiny(()))


# ---------------------------------------------------------------------- training and the CLI


def test_training_draws_a_quality_per_image(model):
    from pipeline.training.trainer import rate_distortion

    torch.manual_seed(0)
    train = _tiny()
    train.train()
    x = torch.rand(4, 3, 64, 64)
    out = train(x, quality=torch.tensor([1.0, 1.5, 2.5, 3.0]))
    bpp, mse = rate_distortion(out, x, per_image=True)
    assert bpp.shape == (4,) and mse.shape == (4,)
    loss = (bpp + R.lambda_of(torch.tensor([1.0, 1.5, 2.5, 3.0]), LAMBDAS) * mse).mean()
    loss.backward()
    assert train.entropy_model.log2_gain.grad.abs().sum() > 0 and train.entropy_model.rate_embed.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="quality per image"):
        train(x)
    assert torch.allclose(R.lambda_of(torch.tensor([1.0, 2.0, 1.5]), LAMBDAS),
                          torch.tensor([0.002, 0.02, math.sqrt(0.002 * 0.02)]))


def _m2t(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, cwd=REPO)


def test_cli_quality_and_targets(model, tmp_path):
    from PIL import Image

    ckpt = registry.save_checkpoint(model, tmp_path / "tiny-vr.safetensors", float_entropy_model=False)
    Image.fromarray(golden_image(64, 96)).save(tmp_path / "in.png")
    out = _m2t("encode", str(tmp_path / "in.png"), str(tmp_path / "a.m2t"), "--model", str(ckpt), "--quality", "2.25")
    assert out.returncode == 0 and "quality 2.25" in out.stdout, out.stderr
    info = _m2t("info", str(tmp_path / "a.m2t"))
    assert "quality" in info.stdout and "2.25" in info.stdout and "6 (" in info.stdout
    dec = _m2t("decode", str(tmp_path / "a.m2t"), str(tmp_path / "a.png"), "--model", str(ckpt))
    assert dec.returncode == 0, dec.stderr
    bad = _m2t("encode", str(tmp_path / "in.png"), str(tmp_path / "b.m2t"), "--model", str(ckpt), "--quality", "9")
    assert bad.returncode == 2 and "outside this model's range [1, 3]" in bad.stderr
    target = _m2t("encode", str(tmp_path / "in.png"), str(tmp_path / "c.m2t"), "--model", str(ckpt),
                  "--target-bpp", "2.0")
    assert target.returncode == 0 and "at quality" in target.stdout, target.stderr
    fixed = _m2t("encode", str(tmp_path / "in.png"), str(tmp_path / "d.m2t"), "--model", "m2t-small-q1",
                 "--quality", "2")
    assert fixed.returncode == 2 and "one rate" in fixed.stderr


# ---------------------------------------------------------------------- the jobs


@pytest.fixture
def installed(model, tmp_path, monkeypatch) -> Path:
    """The tiny variable-rate model as a user installs one (streams find it by name and hash)."""
    path = registry.save_checkpoint(model, tmp_path / "models" / "tiny-vr.safetensors", float_entropy_model=False)
    monkeypatch.setenv("M2T_MODEL_PATH", str(path.parent))
    return path


def _images(folder: Path, count: int = 3) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    for n in range(count):
        Image.fromarray(golden_image(48 + 16 * n, 64)).save(folder / f"im{n}.png")
    return folder


def test_compress_and_verify_jobs_at_a_quality(installed, tmp_path):
    import pyarrow.parquet as pq

    from pipeline.jobs import compress as C
    from pipeline.jobs import verify as V

    corpus = _images(tmp_path / "in")
    cfg = C.load_config(None, ["shard_size=2", "torch_threads=1", "ray.enabled=false", "quality=1.75"])
    cfg = C.CompressConfig(**{**cfg.__dict__, "input": str(corpus), "output": str(tmp_path / "a.m2t"),
                              "model": str(installed)})
    report, code = C.compress_dataset(cfg, progress=False)
    assert code == C.EXIT_OK, report
    rows = [r for p in sorted((tmp_path / "a.m2t" / "shards").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)
    blob = (tmp_path / "a.m2t" / "shards" / "00000.bin").read_bytes()
    first = blob[rows[0]["offset"]:rows[0]["offset"] + rows[0]["length"]]
    assert bs.read_header(first).quality == 448 and bs.read_header(first).version == 6
    manifest = __import__("json").loads((tmp_path / "a.m2t" / "manifest.json").read_text())
    assert manifest["bitstream_format_version"] == 6
    assert V.verify_main([str(tmp_path / "a.m2t"), "--no-ray", "--no-progress", "--against-source",
                          "--report", str(tmp_path / "verify.json")]) == V.EXIT_OK
    # A resume at another quality would mix qualities in one archive: refused.
    again = C.CompressConfig(**{**cfg.__dict__, "quality": 2.5})
    with pytest.raises(Exception, match="settings|quality"):
        C.compress_dataset(again, progress=False)
    bad = C.CompressConfig(**{**cfg.__dict__, "quality": 7.0, "output": str(tmp_path / "b.m2t")})
    with pytest.raises(ConfigError, match="outside this model's range"):
        C.compress_dataset(bad, progress=False)


def test_eval_codes_a_variable_rate_model_at_every_level(installed, tmp_path):
    import pyarrow.parquet as pq

    from pipeline.evaluation import evaluate as E

    data = _images(tmp_path / "data", 2)
    cfg = E.EvalConfig(data=str(data), output=str(tmp_path / "eval"), models=[str(installed)], baselines="none",
                       anchor="tiny-vr", ms_ssim=False, ray=E.RayOptions(enabled=False))
    summary, code = E.evaluate(cfg, progress=False)
    assert code == E.EXIT_OK, summary
    rows = pq.read_table(tmp_path / "eval" / "per_image.parquet").to_pylist()
    assert sorted({r["point"] for r in rows}) == ["tiny-vr@1", "tiny-vr@2", "tiny-vr@3"]
    assert all(r["status"] == "ok" for r in rows) and len(rows) == 6
    by_point = {p: np.mean([r["bpp"] for r in rows if r["point"] == p]) for p in ("tiny-vr@1", "tiny-vr@3")}
    assert by_point["tiny-vr@1"] < by_point["tiny-vr@3"]


# ---------------------------------------------------------------------- portable, pinned


def _integer_defined_model() -> M2TCodec:
    """A variable-rate model whose every decoding number is an integer given here: the shipped
    m2t-small-q4's integers (its golden streams pin them) and rate tables from a seeded numpy
    generator (the same on every platform). So its streams and pixels may be pinned."""
    source = registry.load_model("m2t-small-q4")
    model = M2TCodec(source.cfg.replace(rate_lambdas=(0.02, 0.07, 0.25)), model_id="m2t-small-q4", export=False)
    model.load_state_dict(source.state_dict(), strict=False)
    rng = np.random.default_rng(7)
    K, C, D = 3, model.cfg.C, model.cfg.d_model
    with torch.no_grad():
        model.exact.rate_log2_gain.copy_(torch.from_numpy(rng.integers(-300, 301, (K, C))))
        model.exact.rate_log2_gain[1] = 0
        model.exact.rate_embed.copy_(torch.from_numpy(rng.integers(-400, 401, (K, D))))
        model.exact.load_into(model.entropy_model)
    model.mark_exact_synced()
    return model.eval()


# quality -> (sha256 of the stream, sha256 of its decoded pixels), first 16 hex digits. They
# follow m2t-small-q4's weights: re-pinned when m2t 0.7.6 released a retrained q4.
PINNED = {
    1.5: ("eae00db5dcab56ea", "8f366b8bd3a7b958"),
    2.75: ("00d3c6b539f8f4ec", "f90a4ffa88c41c61"),
}


@pytest.mark.parametrize("quality", sorted(PINNED))
def test_streams_and_pixels_are_the_same_on_every_machine(quality):
    model = _integer_defined_model()
    y_hat = torch.from_numpy(np.load(REPO / "tests/data/golden-m2t-small-q4.latent.npy")).float()
    rgb = golden_image()
    H, W = rgb.shape[:2]
    stream = Encoder(model).encode_latent(y_hat, H, W, model.quality_code(quality)).bitstream
    pixels = {threads: None for threads in (1, 2)}
    for threads in pixels:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            pixels[threads] = Decoder(model).decompress(stream)
        finally:
            torch.set_num_threads(previous)
    assert np.array_equal(pixels[1], pixels[2])
    digests = (hashlib.sha256(stream).hexdigest()[:16], hashlib.sha256(pixels[1].tobytes()).hexdigest()[:16])
    assert digests == PINNED[quality], digests


def test_the_ladder_judge_refuses_a_variable_rate_candidate(model, tmp_path, capsys):
    from pipeline.training import select_model

    path = registry.save_checkpoint(model, tmp_path / "tiny-vr.safetensors", float_entropy_model=False)
    assert select_model.main([str(path)]) == 2
    assert "variable-rate model" in capsys.readouterr().err
