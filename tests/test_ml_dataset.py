"""pipeline/ml ArchiveDataset: a PyTorch IterableDataset over a real archive (tests/_archives.py:
6 ok images, 2 error rows, 3 shards), read by real DataLoaders with worker processes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.ml import ArchiveDataset, collate_samples
from pipeline.ml.reader import split_units
from pipeline.storage import archive as A
from _archives import ERROR_KEYS, OK_KEYS, SIDE, archive, damaged_copy, decoded  # noqa: F401 (fixtures)


def keys_of(loader) -> list[str]:
    return [sample["key"] for sample in loader]


@pytest.mark.parametrize("ranks", [1, 2])
def test_each_ok_image_once_per_epoch_with_workers_and_ranks(archive, decoded, ranks):
    """2 DataLoader workers on each of `ranks` simulated ranks: 2 or 4 readers over 3 shards
    (with 4, shards are split by rows). Error rows are skipped; pixels are the full decode."""
    seen: list[str] = []
    for rank in range(ranks):
        ds = ArchiveDataset(str(archive), rank=rank, world_size=ranks, shuffle=True, seed=3)
        for epoch in range(2):
            ds.set_epoch(epoch)
            epoch_keys = []
            for sample in DataLoader(ds, batch_size=None, num_workers=2):
                epoch_keys.append(sample["key"])
                assert np.array_equal(np.asarray(sample["image"]), decoded[sample["key"]])
                assert sample["metadata"]["width"] == SIDE and sample["metadata"]["source"].endswith(sample["key"])
            if epoch == 0:
                seen += epoch_keys
    assert sorted(seen) == sorted(OK_KEYS), seen  # each once, none of the error rows


def test_units_cover_every_row_once():
    shards = ("00000", "00001", "00002")
    for consumers in range(1, 9):
        units = split_units(shards, consumers)
        assert len(units) >= consumers
        rows = [(shard, r) for shard, part, parts in units for r in range(10)[part::parts]]
        assert sorted(rows) == sorted((s, r) for s in shards for r in range(10))


def test_shuffle_is_seeded_and_changes_by_epoch(archive):
    ds = ArchiveDataset(str(archive), shuffle=True, shuffle_buffer=4, seed=7)
    first = keys_of(ds)
    assert keys_of(ds) == first and sorted(first) == sorted(OK_KEYS)
    orders = {tuple(first)}
    for epoch in range(1, 4):
        ds.set_epoch(epoch)
        orders.add(tuple(keys_of(ds)))
    assert len(orders) > 1
    assert keys_of(ArchiveDataset(str(archive))) == sorted(OK_KEYS)  # no shuffle: index order


def test_error_rows_and_bad_streams_are_skipped_and_counted(archive, tmp_path):
    ds = ArchiveDataset(str(archive))
    assert len(keys_of(ds)) == len(OK_KEYS) and ds.num_images == len(OK_KEYS)
    assert ds.last_stats.as_dict()["not_ok"] == {"error": len(ERROR_KEYS)} and not ds.last_stats.failed
    # A flipped byte in one stream: that image is skipped (CRC-32), the epoch goes on.
    copy = damaged_copy(archive, tmp_path / "damaged.m2t", OK_KEYS[1], 0x10)
    ds = ArchiveDataset(str(copy))
    keys = keys_of(ds)
    assert sorted(keys) == sorted(set(OK_KEYS) - {OK_KEYS[1]})
    assert dict(ds.last_stats.failed) == {"crc_mismatch": 1} and OK_KEYS[1] in ds.last_stats.messages[0]
    # An index row that points outside its blob: skipped before anything is read.
    import pyarrow.parquet as pq

    row = A.lookup(str(copy), OK_KEYS[0])
    index = copy / "shards" / f"{row['shard']}.parquet"
    table = pq.read_table(index).to_pylist()
    for r in table:
        if r["key"] == OK_KEYS[0]:
            r["offset"] = 10**9
    pq.write_table(pq.read_table(index).from_pylist(table, schema=pq.read_schema(index)), index)
    ds = ArchiveDataset(str(copy))
    assert sorted(keys_of(ds)) == sorted(set(OK_KEYS) - {OK_KEYS[0], OK_KEYS[1]})
    assert dict(ds.last_stats.failed) == {"crc_mismatch": 1, "bad_offset": 1}


def test_previews_read_prefixes(archive):
    ds = ArchiveDataset(str(archive), steps=2, output="torch")
    samples = list(ds)
    assert len(samples) == len(OK_KEYS)
    for sample in samples:
        image = sample["image"]
        assert image.dtype == torch.uint8 and tuple(image.shape) == (3, SIDE, SIDE)
        want = A.get_image(str(archive), sample["key"], steps=2)  # one prefix read
        assert np.array_equal(image.permute(1, 2, 0).numpy(), want)


def test_batched_decoding_and_collate(archive, decoded):
    ds = ArchiveDataset(str(archive), batch_images=3, output="torch")
    batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate_samples)))
    assert batch["image"].shape == (4, 3, SIDE, SIDE) and len(batch["key"]) == 4
    for key, image in zip(batch["key"], batch["image"]):
        # The latent is exact in any batch; g_s of one image at a time on the CPU gives the same pixels.
        assert np.array_equal(image.permute(1, 2, 0).numpy(), decoded[key])


def test_a_few_steps_of_training_from_the_archive(archive):
    """A real training loop: a small conv autoencoder on random 32x32 crops, 2 workers."""
    torch.manual_seed(0)

    def crop(image: torch.Tensor) -> torch.Tensor:
        y, x = torch.randint(0, SIDE - 32 + 1, (2,)).tolist()
        return image[:, y:y + 32, x:x + 32].float() / 255.0

    ds = ArchiveDataset(str(archive), output="torch", transform=crop, shuffle=True, seed=1)
    loader = DataLoader(ds, batch_size=3, num_workers=2)  # default_collate: metadata has no None
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 3, 3, padding=1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in net.parameters()]
    losses, steps = [], 0
    for epoch in range(2):
        ds.set_epoch(epoch)
        for batch in loader:
            loss = torch.nn.functional.mse_loss(net(batch["image"]), batch["image"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            steps += 1
            assert batch["image"].shape == (3, 3, 32, 32) and len(batch["key"]) == 3
            assert batch["metadata"]["width"].tolist() == [SIDE] * 3
    assert steps == 4 and all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_reads_from_s3(archive, decoded, s3_bucket):
    import s3fs

    bucket, options = s3_bucket
    s3fs.S3FileSystem(**options).put(str(archive), f"{bucket}/a.m2t", recursive=True)
    ds = ArchiveDataset(f"s3://{bucket}/a.m2t", storage_options={"s3": options})
    got = {s["key"]: s["image"] for s in ds}
    assert sorted(got) == sorted(OK_KEYS) and all(np.array_equal(got[k], decoded[k]) for k in OK_KEYS)


def test_bad_arguments_and_archives(archive, tmp_path):
    with pytest.raises(ValueError, match="output must be"):
        ArchiveDataset(str(archive), output="pil")
    with pytest.raises(ValueError, match="rank must be"):
        ArchiveDataset(str(archive), rank=2, world_size=2)
    with pytest.raises(A.ArchiveIncompleteError, match="manifest.json"):
        ArchiveDataset(str(tmp_path))
    with pytest.raises(A.ArchiveError, match="needs model"), pytest.MonkeyPatch.context() as mp:
        mp.setenv("M2T_MODEL_PATH", "")  # the archive's model is installed nowhere
        ArchiveDataset(str(archive))
