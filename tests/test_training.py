"""The training job (pipeline/training/: trainer.py, data.py, checkpoints.py) on a toy model and
generated images, on the CPU."""

from __future__ import annotations

import copy

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import m2t_core
from m2t_core import M2TCodec, registry
from m2t_core.config import ConfigError
from pipeline.storage.sources import SourceError
from pipeline.training import checkpoints as CK
from pipeline.training import data as D
from pipeline.training import trainer as T

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


def write_parquet(path: Path, images: list[Path], row_group_size: int = 2) -> None:
    """The images as a Hugging Face-style Parquet file: a struct column {bytes, path}."""
    rows = [{"image": {"bytes": p.read_bytes(), "path": p.name}, "label": i} for i, p in enumerate(images)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)


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
    with pytest.raises(ConfigError, match="parquet_image_column"):
        T.load_config(TINY, ["train_data=/x", "parquet_image_column=[1]"])
    # Missing data is reported before any training starts, as exit status 2.
    assert T.main(["--config", str(TINY), "--no-ray", "--set", f"train_data={tmp_path}/none",
                   "--set", f"output_dir={tmp_path}/run"]) == 2
    (tmp_path / "empty").mkdir()  # there, but nothing to train on: a usage error too
    (tmp_path / "empty" / "notes.txt").write_text("no images")
    assert T.main(["--config", str(TINY), "--no-ray", "--set", f"train_data={tmp_path}/empty",
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


def test_data_folder_tar_parquet_and_crops(tmp_path, shared_datasets):
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
    write_parquet(tmp_path / "rows.parquet", paths)
    folder, shards = D.list_samples(str(tmp_path / "imgs")), D.list_samples(str(shard.parent))
    rows = D.list_samples(str(tmp_path / "rows.parquet"))
    assert len(folder) == len(shards) == len(rows) == 3  # the .json members are not images
    assert rows[2].endswith("rows.parquet#row=2") and shards[0].endswith("shard-000.tar#img00.jpg")
    for a, b, c in zip(folder, shards, rows):
        assert np.array_equal(D.read_sample(a), D.read_sample(b))
        assert np.array_equal(D.read_sample(a), D.read_sample(c))
    everything = D.list_samples(str(tmp_path))  # one folder holding all three formats
    assert sorted(everything) == sorted(folder + shards + rows)
    rng = np.random.default_rng(0)
    small = np.zeros((40, 50, 3), np.uint8)  # smaller than the crop: upscaled
    assert D.random_crop(small, 64, rng).shape == (64, 64, 3)
    photos = D.list_samples(str(shared_datasets / "train" / "skimage-data"))
    ds = D.CropDataset(photos, 256)
    assert ds[0].shape == (3, 256, 256) and ds[0].dtype == torch.uint8
    with pytest.raises(SourceError, match="no images"):
        D.list_samples(str(tmp_path / "shards" / "*.json"))


def test_crops_in_dataloader_workers_from_tar_and_parquet(tmp_path):
    """Forked DataLoader workers read through copies of the listing's SourceCache: the tar
    index travels with it; each worker opens its own files."""
    paths = make_images(tmp_path / "imgs", 4)
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        for p in paths:
            tar.add(p, arcname=p.name)
    write_parquet(tmp_path / "b.parquet", paths)
    cache = D.SourceCache()
    samples = D.list_samples([str(tmp_path / "a.tar"), str(tmp_path / "b.parquet")], cache=cache)
    assert len(samples) == 8
    loader = torch.utils.data.DataLoader(D.CropDataset(samples, 32, cache=cache), batch_size=4, num_workers=2,
                                         sampler=D.InfiniteSampler(len(samples), seed=0))
    batches = iter(loader)
    for _ in range(4):
        assert next(batches).shape == (4, 3, 32, 32)
    del batches, loader


def test_training_from_parquet(tmp_path, caplog):
    """A Parquet file (rows in two-row groups, one null image) trains like a folder; the null
    row is named in a warning and skipped."""
    paths = make_images(tmp_path / "imgs", 5)
    write_parquet(tmp_path / "train.parquet", paths)
    rows = pq.read_table(tmp_path / "train.parquet").to_pylist()
    rows[3]["image"] = None
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet", row_group_size=2)
    cfg = tiny_config(tmp_path / "train.parquet", tmp_path / "run", "steps=6", "log_every=2",
                      "parquet_image_column=image", val=tmp_path / "train.parquet")
    with caplog.at_level(logging.WARNING, logger="pipeline.training"):
        export = T.train(cfg)
    assert export.is_file() and [r["step"] for r in read_metrics(tmp_path / "run", "train")] == [2, 4, 6]
    assert read_metrics(tmp_path / "run", "val")[-1]["images"] == 2  # val_images: the first two rows
    # 12 crops from 5 rows in shuffled passes: row 3 was drawn, named once, then left out.
    named = [r.getMessage() for r in caplog.records if "train.parquet#row=3" in r.getMessage()]
    assert len(named) == 1 and "null in column 'image'" in named[0], named


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
    # model as it is; its float entropy weights are rebuilt from those integers, and its
    # integer g_s is derived from the rounded float g_s (so the file leaves its weights out).
    last = registry.load_checkpoint(tiny_run / "last.safetensors")
    exported = registry.load_checkpoint(export)
    for k, v in last.state_dict().items():
        if k.startswith(("entropy_model.", "g_s_int.")):
            continue
        assert torch.equal(exported.state_dict()[k], v.half().float() if v.is_floating_point() else v), k
    stored = load_file(str(export))
    assert not any(k.startswith("entropy_model.") or k.endswith(".weight") and k.startswith("g_s_int.") for k in stored)
    rederived = copy.deepcopy(exported.g_s_int)
    rederived.export_from(exported.g_s)
    for k, v in rederived.state_dict().items():
        assert torch.equal(exported.g_s_int.state_dict()[k], v), k
    # A bitstream of the exported model decodes, through a freshly loaded copy, to its reconstruction.
    rgb = np.asarray(Image.open(next((tiny_run.parent / "val").iterdir())).convert("RGB"))
    enc = m2t_core.Encoder(exported, reconstruct=True).encode_image(rgb)
    again = registry.load_checkpoint(export)
    assert m2t_core.Encoder(again).encode_image(rgb).bitstream == enc.bitstream
    assert np.array_equal(m2t_core.decompress(enc.bitstream, model=again), enc.x_hat)
    # save_state -> load_state restores weights and optimizer moments exactly.
    model, opt = _trained_copy(last)
    CK.save_state(tmp_path, model, opt, 7, 1.0, T.load_config(TINY, ["train_data=/x"]))
    model2 = M2TCodec(model.cfg)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    assert CK.load_state(tmp_path, model2, opt2) == (7, 1.0)
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


def test_time_limit_stops_checkpoints_and_exports_at_the_step_reached(tmp_path, caplog):
    make_images(tmp_path / "train", 4)
    cfg = tiny_config(tmp_path / "train", tmp_path / "run", "steps=100000", "log_every=5", "checkpoint_every=1000",
                      "time_limit_s=2")
    with caplog.at_level(logging.INFO):
        T.train(cfg)
    step = json.loads((tmp_path / "run" / "last-state.json").read_text())["step"]
    assert 0 < step < 100000 and "time limit of 2 s reached" in caplog.text
    info = registry.read_metadata(tmp_path / "run" / "tiny-test.safetensors")[2]
    assert info["steps"] == step and info["crops_seen"] == step * 2
    with pytest.raises(ConfigError, match="ray.workers: 1"):
        tiny_config(tmp_path / "train", tmp_path / "run2", "time_limit_s=5", "ray.workers=2")


def test_ray_trainer_one_worker(tmp_path, ray_cluster):
    make_images(tmp_path / "train", 3)
    cfg = tiny_config(tmp_path / "train", tmp_path / "run", "steps=3", "log_every=1")
    export = T.train(cfg, use_ray=True)
    assert export.is_file()
    assert [r["step"] for r in read_metrics(tmp_path / "run", "train")] == [1, 2, 3]
    assert registry.load_checkpoint(export).model_id == "tiny-test"


def test_a_warm_start_can_keep_its_exponents_through_qat(tiny_run, tmp_path):
    """recalibrate: false (warm starts only) trains through the integer grid on the exponents
    the checkpoint came with, and exports on them: the exact model's and the integer g_s's
    activation exponents are the starting model's, its integers those of the trained weights."""
    start = tiny_run / "tiny-test.safetensors"
    before = registry.load_checkpoint(start)
    cfg = tiny_config(tiny_run.parent / "train", tmp_path / "run", f"init_from={start}", "steps=6",
                      "qat_from=0.5", "recalibrate=false", "log_every=2", "warmup_steps=0")
    after = registry.load_checkpoint(T.train(cfg))
    assert torch.equal(after.exact.act_exp, before.exact.act_exp)
    assert torch.equal(after.g_s_int.act_exp, before.g_s_int.act_exp)
    assert not torch.equal(after.exact.linears["head"].bias, before.exact.linears["head"].bias)  # trained
    with pytest.raises(ConfigError, match="recalibrate: false .* needs init_from"):
        tiny_config(tiny_run.parent / "train", tmp_path / "run2", "recalibrate=false")
