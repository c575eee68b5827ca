"""`read_archive(url)`: an m2t archive as a `ray.data.Dataset` of rows {key, image, metadata}.

    import ray
    from pipeline.ml import read_archive

    ds = read_archive("s3://bucket/photos.m2t", concurrency=4)      # lazy; streams when consumed
    for batch in ds.iter_batches(batch_size=32, batch_format="numpy"): ...
    trainer = TorchTrainer(..., datasets={"train": ds})             # Ray Train shards it per worker

Built from Ray Data's own parts: `ray.data.from_items` of the archive's work units (whole
shards, or row sets of a shard when there are fewer shards than decoders: reader.split_units),
then `map_batches` with a pool of decoder actors (`concurrency` of them; on a cluster with GPUs
each pins `num_gpus` of one and decodes there). An actor checks its unit's index against the
blob (pipeline/storage/index_checks.py), reads and decodes `batch_size` streams at a time
(batched: `batch_images` streams per transformer pass) and yields them as one block each, so
memory stays bounded by Ray Data's streaming backpressure, never by the archive's size. Rows
that are not ok in the index, and streams that fail their checks or do not decode, are skipped
and counted in the actor's log (warnings name them); none is raised.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator, Mapping

import numpy as np

from pipeline.ml.reader import ArchiveSpec, ImageDecoder, ReadStats, metadata, ok_rows, open_archive, read_shard_rows, \
    split_units

log = logging.getLogger(__name__)

UNITS_PER_DECODER = 2  # work units per actor at least (shards split by rows below that): balance


class ArchiveDecoder:
    """A Ray Data actor: the archive's model loaded once; each call decodes one work unit."""

    def __init__(self, spec: ArchiveSpec, steps: int | None, batch_size: int, batch_images: int, device: str):
        self.spec, self.batch_size = spec, batch_size
        self.decoder = ImageDecoder(spec, steps, batch_images, device)
        self.archive = spec.archive()
        self.stats = ReadStats()

    def __call__(self, units: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        for shard, part, parts in zip(units["shard"], units["part"], units["parts"]):
            shard = str(shard)
            rows = ok_rows(read_shard_rows(self.spec, shard, self.stats, self.archive)[int(part)::int(parts)], self.stats)
            batch: list[tuple[dict, np.ndarray]] = []
            for decoded in self.decoder.decode_rows(self.archive, shard, rows, self.stats):
                batch.append(decoded)
                if len(batch) >= self.batch_size:
                    yield self._block(batch)
                    batch = []
            if batch:
                yield self._block(batch)
        if self.stats.not_ok or self.stats.failed:
            log.info("archive %s: skipped so far: %s", self.spec.url, self.stats.as_dict())

    def _block(self, decoded: list[tuple[dict, np.ndarray]]) -> dict[str, Any]:
        self.stats.yielded += len(decoded)
        return {"key": [row["key"] for row, _ in decoded], "image": [rgb for _, rgb in decoded],
                "metadata": [metadata(row) for row, _ in decoded]}


def _defaults(concurrency: int | None, num_gpus: float | None) -> tuple[int, float]:
    """(actors, GPUs per actor): one actor per GPU where the cluster has GPUs, else one per CPU."""
    import ray

    resources = ray.cluster_resources()
    gpus = float(resources.get("GPU", 0))
    if num_gpus is None:
        num_gpus = 1.0 if gpus >= 1 else 0.0
    if concurrency is None:
        concurrency = int(gpus // num_gpus) if num_gpus > 0 else int(resources.get("CPU", 1))
    return max(1, concurrency), num_gpus


def read_archive(url: str, *, storage_options: Mapping | None = None, model: str | None = None,
                 steps: int | None = None, batch_size: int = 16, batch_images: int = 0,
                 concurrency: int | None = None, num_gpus: float | None = None, num_cpus: float = 1.0):
    """A lazy ray.data.Dataset of the archive's ok images: rows {"key": str, "image": uint8
    (H, W, 3), "metadata": {source, shard, height, width, source_bytes, bpp, psnr}}.

    steps=K: previews of the first K coding steps (only those bytes read). batch_size: images
    per block an actor yields. concurrency: decoder actors (default: one per GPU, else one per
    CPU of the cluster). num_gpus: per actor (default 1 where the cluster has GPUs, else 0).
    The manifest and model are checked here, on the driver (ArchiveError before any work)."""
    import ray

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not ray.is_initialized():
        from pipeline.jobs.runner import connect_ray

        connect_ray()
    spec = open_archive(url, storage_options, model)
    if spec.images > spec.ok:
        log.info("%s: %d of %d index rows are not ok (error or duplicate) and are skipped", spec.url,
                 spec.images - spec.ok, spec.images)
    concurrency, num_gpus = _defaults(concurrency, num_gpus)
    units = [{"shard": s, "part": p, "parts": n} for s, p, n in split_units(spec.shards, concurrency * UNITS_PER_DECODER)]
    device = "cuda" if num_gpus > 0 else "cpu"
    return ray.data.from_items(units, override_num_blocks=max(1, len(units))).map_batches(
        ArchiveDecoder, batch_size=1, fn_constructor_args=(spec, steps, batch_size, batch_images, device),
        concurrency=concurrency, num_gpus=num_gpus, num_cpus=num_cpus, batch_format="numpy")
