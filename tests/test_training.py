"""The training job (pipeline/training.py) on a toy model and generated images, on the CPU."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import m2t_core
from m2t_core import registry
from m2t_core.codec import M2TCodec
from m2t_core.config import ConfigError
from pipeline.training.trainer import trainer as T

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "train" / "tiny-test.yaml"


def make_images(folder: Path, count: int, seed: int = 0, fmt: str = "png") -> list[Path]:
    """Smooth colour patterns plus mild noise: compressible, so a codec can learn them fast."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        h, w = int(rng.integers(80, 130)), int(rng.integers(80, 130))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        f = rng.uniform(0.03, 0.2, size=3)
        img = np.stack([128 + 100 * np.sin(xx * f[0] + yy * f[1]), 128 + 100 * np.cos(yy * f[2]),
                        (xx + yy) * 255 / (h + w)], axis=-1)
        img = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
        path = folder / f"img{i:02d}.{fmt}"
        Image.fromarray(img).save(path)
        paths.append(path)
    return paths


def tiny_config(train: Path, out: Path, *sets: str, val: Path | None = None) -> T.TrainConfig:
    base = [f"train_data={train}", f"output_dir={out}"] + ([f"val_data={val}"] if val else [])
    return T.load_config(TINY, base + list(sets))


def read_metrics(out: Path, kind: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    make_images(root / "train", 6)
    make_images(root / "val", 2, seed=1)
    cfg = tiny_config(root / "train", root / "run", "steps=40", "log_every=4", "seed=0", val=root / "val")
    export = T.train(cfg)
    assert export == root / "run" / "tiny-test.safetensors"
    return root / "run"


# ---------------------------------------------------------------- config


def test_config_errors_and_overrides(tmp_path):
    cfg = T.load_config(TINY, ["train_data=/x", "lr=1e-4", "ray.workers=2", "mt_mask_range=[0.1, 0.5]"])
    assert cfg.lr == 1e-4 and cfg.ray.workers == 2 and cfg.mt_mask_range == (0.1, 0.5)
    assert cfg.model == str(REPO / "configs" / "models" / "tiny-test.yaml")  # relative to the file
    with pytest.raises(ConfigError, match="bogus"):
        T.load_config(TINY, ["train_data=/x", "bogus=1"])
    with pytest.raises(ConfigError, match="train_data is required"):
        T.load_config(TINY)
    with pytest.raises(ConfigError, match="amp"):
        T.load_config(TINY, ["train_data=/x", "amp=fp8"])
    with pytest.raises(ConfigError, match="model_id"):
        T.load_config(TINY, ["train_data=/x", "model_id=no spaces"])
    # Missing data is reported before any training starts, as exit status 2.
    assert T.main(["--config", str(TINY), "--no-ray", "--set", f"train_data={tmp_path}/none",
                   "--set", f"output_dir={tmp_path}/run"]) == 2


def test_schedules_and_mt_rate():
    cfg = T.load_config(TINY, ["train_data=/x", "steps=100", "warmup_steps=10", "lr=1.0e-3",
                               "lambda_boost=10", "lambda_boost_fraction=0.15", "lmbda=0.01"])
    assert T.lr_at(cfg, 5) == pytest.approx(5e-4) and T.lr_at(cfg, 50) == pytest.approx(1e-3)
    assert T.lr_at(cfg, 91) == pytest.approx(1e-4)
    assert T.lmbda_at(cfg, 15) == pytest.approx(0.1) and T.lmbda_at(cfg, 16) == pytest.approx(0.01)
    # MT: 1 bit per channel on the masked half of the tokens -> estimated for all tokens.
    lik = torch.full((1, 4, 2, 2), 0.5)
    mask = torch.tensor([[[[True, False], [False, True]]]])
    out = {"likelihoods": {"y": lik}, "rate_mask": mask, "x_hat": torch.zeros(1, 3, 32, 32)}
    bpp, mse = T.rate_distortion(out, torch.full((1, 3, 32, 32), 1 / 255))
    assert bpp.item() == pytest.approx(4 * 4 / (32 * 32)) and mse.item() == pytest.approx(1.0)


# ---------------------------------------------------------------- data


def test_data_folder_tar_and_crops(tmp_path, shared_datasets):
    paths = make_images(tmp_path / "imgs", 3, fmt="jpg")
    shard = tmp_path / "shards" / "shard-000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for p in paths:
            tar.add(p, arcname=f"{p.stem}.jpg")
            meta = json.dumps({"src": p.name}).encode()
            info = tarfile.TarInfo(f"{p.stem}.json")
            info.size = len(meta)
            tar.addfile(info, io.BytesIO(meta))
    folder, shards = T.list_samples(str(tmp_path / "imgs")), T.list_samples(str(shard.parent))
    assert len(folder) == len(shards) == 3  # the .json members are not images
    for a, b in zip(folder, shards):
        assert np.array_equal(T.read_sample(a), T.read_sample(b))
    rng = np.random.default_rng(0)
    small = np.zeros((40, 50, 3), np.uint8)  # smaller than the crop: upscaled
    assert T.random_crop(small, 64, rng).shape == (64, 64, 3)
    photos = T.list_samples(str(shared_datasets / "train" / "skimage-data"))
    ds = T.CropDataset(photos, 256)
    assert ds[0].shape == (3, 256, 256) and ds[0].dtype == torch.uint8


def test_bad_file_is_skipped_with_a_warning(tmp_path, caplog):
    make_images(tmp_path / "train", 1)
    (tmp_path / "train" / "broken.jpg").write_bytes(b"this is not a jpeg")
    cfg = tiny_config(tmp_path / "train", tmp_path / "run", "steps=3", "log_every=1")
    with caplog.at_level(logging.WARNING, logger="pipeline.training"):
        T.train(cfg)
    warnings = [r.getMessage() for r in caplog.records if "broken.jpg" in r.getMessage()]
    assert len(warnings) == 1, warnings  # named, and only once
    assert len(read_metrics(tmp_path / "run", "train")) == 3


# ---------------------------------------------------------------- training


def test_tiny_training_lowers_the_loss(tiny_run):
    losses = [r["loss"] for r in read_metrics(tiny_run, "train")]
    assert len(losses) == 10
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < 0.8 * first, losses
    val = read_metrics(tiny_run, "val")
    assert val and val[-1]["exported"] and val[-1]["images"] == 2 and val[-1]["bpp"] > 0


def test_export_and_checkpoint_round_trip(tiny_run, tmp_path):
    export = tiny_run / "tiny-test.safetensors"
    model_id, config, info = registry.read_metadata(export)
    assert model_id == "tiny-test"
    for key in ("train_data", "crop_size", "steps", "batch_size", "lambda", "wall_time_s", "hardware",
                "val_bpp", "val_psnr"):
        assert key in info, key
    assert info["steps"] == 40 and info["crop_size"] == 64 and info["val_bpp"] > 0
    # The export is the last transforms rounded to fp16 and the last exact (integer) entropy
    # model as it is; its float entropy weights are rebuilt from those integers.
    last = registry.load_checkpoint(tiny_run / "last.safetensors")
    exported = registry.load_checkpoint(export)
    for k, v in last.state_dict().items():
        if k.startswith("entropy_model."):
            continue
        assert torch.equal(exported.state_dict()[k], v.half().float() if v.is_floating_point() else v), k
    assert not any(k.startswith("entropy_model.") for k in load_file(str(export)))
    # A bitstream of the exported model decodes, through a freshly loaded copy, to its reconstruction.
    rgb = np.asarray(Image.open(next((tiny_run.parent / "val").iterdir())).convert("RGB"))
    enc = exported.encode_image(rgb)
    again = registry.load_checkpoint(export)
    assert again.encode_image(rgb).bitstream == enc.bitstream
    assert np.array_equal(m2t_core.decompress(enc.bitstream, model=again), exported.reconstruct(enc))
    # save_state -> load_state restores weights and optimizer moments exactly.
    model, opt = _trained_copy(last)
    T.save_state(tmp_path, model, opt, 7, 1.0, T.load_config(TINY, ["train_data=/x"]))
    model2 = M2TCodec(model.cfg)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    assert T.load_state(tmp_path, model2, opt2) == (7, 1.0)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x)["x_hat"], model2.eval()(x)["x_hat"])
    restored = 0
    for p, p2 in zip(model.parameters(), model2.parameters()):
        if "exp_avg_sq" in opt.state[p]:  # parameters that got a gradient
            assert torch.equal(opt.state[p]["exp_avg_sq"], opt2.state[p2]["exp_avg_sq"])
            restored += 1
    assert restored > 10


def _trained_copy(model: M2TCodec) -> tuple[M2TCodec, torch.optim.Optimizer]:
    """A model and an optimizer with non-trivial state (one Adam step)."""
    model = M2TCodec(model.cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = model(torch.rand(1, 3, 64, 64))
    T.rate_distortion(out, torch.rand(1, 3, 64, 64))[0].backward()
    opt.step()
    return model, opt


def test_resume_continues_step_count_and_optimizer(tmp_path):
    make_images(tmp_path / "train", 4)
    cfg = tiny_config(tmp_path / "train", tmp_path / "run", "steps=6", "log_every=2", "checkpoint_every=3")
    T.train(cfg)
    out = tmp_path / "run"
    assert json.loads((out / "last-state.json").read_text())["step"] == 6
    with pytest.raises(ConfigError, match="--resume"):
        T.train(cfg)  # refuses to overwrite a training state
    longer = tiny_config(tmp_path / "train", out, "steps=12", "log_every=2", "checkpoint_every=3")
    T.train(longer, resume=True)
    assert [r["step"] for r in read_metrics(out, "train")] == [2, 4, 6, 8, 10, 12]
    assert json.loads((out / "last-state.json").read_text())["step"] == 12
    # Adam's per-parameter step counter went on from 6: the optimizer state was restored.
    optim = load_file(str(out / "last-optim.safetensors"))
    assert {float(t) for k, t in optim.items() if k.endswith(".step")} == {12.0}
    assert registry.read_metadata(out / "tiny-test.safetensors")[2]["steps"] == 12


def test_ray_trainer_one_worker(tmp_path, ray_cluster):
    make_images(tmp_path / "train", 3)
    cfg = tiny_config(tmp_path / "train", tmp_path / "run", "steps=3", "log_every=1")
    export = T.train(cfg, use_ray=True)
    assert export.is_file()
    assert [r["step"] for r in read_metrics(tmp_path / "run", "train")] == [1, 2, 3]
    assert registry.load_checkpoint(export).model_id == "tiny-test"
