"""A small real archive for the readers' tests (test_ml_dataset, test_ml_ray, test_exports).

`make_archive(root)`, and the module fixtures `archive` (it, with its model installed) and
`decoded` (every ok key's full decode, as `m2t get` gives it): 8 inputs of 64x64 (6 ok images, a truncated PNG and an empty file, both
`error` rows), compressed in-process with test_compress's tiny model (4 coding steps,
installed under its name so bitstreams find it) into 3 shards of up to 3 rows.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from m2t_core import save_checkpoint
from pipeline.jobs import compress as C
from pipeline.storage import archive as A
from test_compress import TINY, build_model, job_config, png_bytes, random_image

SIDE = 64
OK_KEYS = [f"img/{i}.png" for i in range(6)]
ERROR_KEYS = ["img/truncated.png", "img/empty.png"]
MODEL_ID = "tiny-ml"


def install_model(folder: Path) -> Path:
    """The tiny model saved under `folder`, which goes on $M2T_MODEL_PATH (the caller's monkeypatch)."""
    path = folder / f"{MODEL_ID}.safetensors"
    save_checkpoint(build_model(TINY, model_id=MODEL_ID), path)
    return path


def source_images() -> dict[str, np.ndarray]:
    return {key: random_image(SIDE, SIDE, seed=i) for i, key in enumerate(OK_KEYS)}


def make_archive(root: Path, checkpoint: Path) -> Path:
    corpus = root / "corpus"
    (corpus / "img").mkdir(parents=True)
    for key, rgb in source_images().items():
        (corpus / key).write_bytes(png_bytes(rgb))
    (corpus / ERROR_KEYS[0]).write_bytes(png_bytes(random_image(SIDE, SIDE, seed=99))[:150])
    (corpus / ERROR_KEYS[1]).write_bytes(b"")
    out = root / "archive.m2t"
    report, _ = C.compress_dataset(job_config(str(corpus), out, checkpoint, "ray.enabled=false", "shard_size=3"),
                                   progress=False)
    totals = report["totals"]
    assert (totals["ok"], totals["error"]) == (len(OK_KEYS), len(ERROR_KEYS)), totals
    return out


def damaged_copy(archive: Path, dest: Path, key: str, flip: int) -> Path:
    """A copy of `archive` with one bit pattern `flip` XORed into the middle of `key`'s stream."""
    import shutil

    shutil.copytree(archive, dest)
    row = A.lookup(str(dest), key)
    blob = dest / "shards" / f"{row['shard']}.bin"
    data = bytearray(blob.read_bytes())
    data[row["offset"] + row["length"] // 2] ^= flip
    blob.write_bytes(bytes(data))
    return dest


def model_path_env(checkpoint: Path) -> str:
    return os.pathsep.join(filter(None, [str(checkpoint.parent), os.environ.get("M2T_MODEL_PATH")]))


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("ml")
    checkpoint = install_model(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("M2T_MODEL_PATH", model_path_env(checkpoint))
        yield make_archive(root, checkpoint)


@pytest.fixture(scope="module")
def decoded(archive):
    return {key: A.get_image(str(archive), key) for key in OK_KEYS}
