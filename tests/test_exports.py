"""`m2t restore --format folder|webdataset|parquet` (pipeline/jobs/exports.py), read back by
the real consumers: the `webdataset` package and Hugging Face `datasets`' Parquet loader, with
pixels equal to the decoded images. The archive: tests/_archives.py (6 ok images, 2 error rows,
3 shards)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.jobs.verify import restore_main
from _archives import OK_KEYS, SIDE, archive, damaged_copy, decoded  # noqa: F401 (fixtures)

SHARDS = ["00000", "00001", "00002"]


def restore(archive, out, *args) -> int:
    return restore_main([str(archive), str(out), "--no-ray", "--no-progress", *args])


def test_webdataset_shards_read_by_webdataset(archive, decoded, tmp_path):
    import webdataset as wds

    out = tmp_path / "wds"
    assert restore(archive, out, "--format", "webdataset") == 0
    assert sorted(p.name for p in out.glob("*.tar")) == [f"{s}.tar" for s in SHARDS]
    urls = [str(out / f"{s}.tar") for s in SHARDS]
    got = {}
    for sample in wds.WebDataset(urls, shardshuffle=False).decode("rgb8"):
        meta = sample["json"]
        assert sample["__key__"].startswith(meta["shard"] + "-")
        assert meta["width"] == SIDE and meta["source"].endswith(meta["key"])
        got[meta["key"]] = sample["png"]
    assert sorted(got) == sorted(OK_KEYS)
    for key in OK_KEYS:
        assert got[key].dtype == np.uint8 and np.array_equal(got[key], decoded[key])
    report = json.loads((out / "restore.json").read_text())
    assert report["written"] == len(OK_KEYS) and report["files"][OK_KEYS[0]].startswith("00000.tar#00000-")


def test_parquet_shards_loaded_by_hugging_face_datasets(archive, decoded, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # never the network
    out = tmp_path / "pq"
    assert restore(archive, out, "--format", "parquet") == 0
    ds = datasets.load_dataset("parquet", data_files=str(out / "*.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf-cache"))
    assert isinstance(ds.features["image"], datasets.Image)
    assert sorted(ds["key"]) == sorted(OK_KEYS)
    for row in ds:
        assert np.array_equal(np.asarray(row["image"].convert("RGB")), decoded[row["key"]])
        assert row["width"] == SIDE and row["source"].endswith(row["key"])


def test_folder_is_the_png_restore(archive, decoded, tmp_path):
    from PIL import Image

    assert restore(archive, tmp_path / "folder", "--format", "folder") == 0
    for key in OK_KEYS:
        assert np.array_equal(np.asarray(Image.open(tmp_path / "folder" / f"{key}.png")), decoded[key])
    assert restore(archive, tmp_path / "x", "--format", "parquet", "--keys", OK_KEYS[0]) == 2  # whole shards only


def test_resume_skips_exported_shards_and_reports_their_issues_again(archive, tmp_path):
    damaged = damaged_copy(archive, tmp_path / "damaged.m2t", OK_KEYS[4], 0x40)
    out = tmp_path / "wds"
    assert restore(damaged, out, "--format", "webdataset") == 1  # one image could not be decoded
    first = json.loads((out / "restore.json").read_text())
    image_issues = lambda report: [i for i in report["issues"] if i["key"] is not None]
    assert first["written"] == len(OK_KEYS) - 1 and [i["key"] for i in image_issues(first)] == [OK_KEYS[4]]
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    (out / "00000.tar.json").unlink()  # as if the run had stopped before that shard's marker
    assert restore(damaged, out, "--format", "webdataset") == 1  # the missing image is still reported
    again = json.loads((out / "restore.json").read_text())
    assert again["written"] == 3 and again["skipped"] == 2 and again["images"] == len(OK_KEYS)
    assert [i["key"] for i in image_issues(again)] == [OK_KEYS[4]] and "recorded" in image_issues(again)[0]["message"]
    assert again["files"] == {k: v for k, v in first["files"].items() if k != OK_KEYS[4]}
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}["00001.tar"] == mtimes["00001.tar"]
    assert not list(out.glob("*.tmp"))


def test_export_to_s3(archive, decoded, s3_bucket, tmp_path):
    import s3fs
    import webdataset as wds

    bucket, options = s3_bucket
    url = f"s3://{bucket}/export"
    assert restore(archive, url, "--format", "webdataset", "--storage-options", json.dumps({"s3": options})) == 0
    fs = s3fs.S3FileSystem(**options)
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{bucket}/export") if p.endswith(".tar")) == \
        [f"{s}.tar" for s in SHARDS]
    fs.get(f"{bucket}/export/", str(tmp_path / "copy"), recursive=True)
    got = {s["json"]["key"]: s["png"] for s in wds.WebDataset(sorted(str(p) for p in (tmp_path / "copy").glob("*.tar")),
                                                               shardshuffle=False).decode("rgb8")}
    assert sorted(got) == sorted(OK_KEYS) and all(np.array_equal(got[k], decoded[k]) for k in OK_KEYS)
