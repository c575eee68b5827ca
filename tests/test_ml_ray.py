"""pipeline/ml read_archive: an archive as a ray.data.Dataset, on the session's local Ray
cluster (tests/conftest.py), over tests/_archives.py's archive (6 ok images, 2 error rows,
3 shards)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.storage import archive as A
from _archives import OK_KEYS, SIDE, install_model, make_archive, model_path_env


@pytest.fixture(scope="module")
def archive(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("mlray")
    checkpoint = install_model(root)
    with pytest.MonkeyPatch.context() as mp:
        # Ray workers are started from the driver's environment at cluster start: they find
        # the model by name through --model (the installed one is resolved on the driver).
        mp.setenv("M2T_MODEL_PATH", model_path_env(checkpoint))
        yield make_archive(root, checkpoint), str(checkpoint)


@pytest.mark.parametrize("concurrency", [1, 2])
def test_read_archive_gives_every_ok_key_once(archive, concurrency):
    from pipeline.ml import read_archive

    path, checkpoint = archive
    ds = read_archive(str(path), model=checkpoint, concurrency=concurrency, batch_size=2)
    rows = ds.take_all()
    keys = [r["key"] for r in rows]
    assert sorted(keys) == sorted(OK_KEYS), keys  # each once; the 2 error rows skipped
    for row in rows:
        assert row["image"].shape == (SIDE, SIDE, 3) and row["image"].dtype == np.uint8
        assert np.array_equal(row["image"], A.get_image(str(path), row["key"]))
        assert row["metadata"]["width"] == SIDE and row["metadata"]["source"].endswith(row["key"])


def test_previews_and_batches(archive):
    from pipeline.ml import read_archive

    path, checkpoint = archive
    ds = read_archive(str(path), model=checkpoint, steps=1, concurrency=1)
    seen = 0
    for batch in ds.iter_batches(batch_size=4, batch_format="numpy"):
        for key, image in zip(batch["key"], batch["image"]):
            assert np.array_equal(image, A.get_image(str(path), key, steps=1))
            seen += 1
    assert seen == len(OK_KEYS)
