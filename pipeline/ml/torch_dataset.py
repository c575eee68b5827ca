"""`ArchiveDataset`: a PyTorch IterableDataset over an m2t archive, decoding on the worker.

    ds = ArchiveDataset("s3://bucket/photos.m2t", output="torch", shuffle=True, seed=0)
    loader = DataLoader(ds, batch_size=32, num_workers=4)
    for epoch in range(E):
        ds.set_epoch(epoch)
        for batch in loader: ...            # batch["image"], batch["key"], batch["metadata"]

Each ok image comes exactly once per epoch, whatever the DataLoader worker count and the
distributed rank count: the consumers (ranks x workers) take work units (pipeline/ml/reader.py
split_units: whole shards, or rows of a shard split by position when there are fewer shards
than consumers) round-robin from one list that every consumer orders the same way (shuffled
by `seed` + epoch). Within a consumer a bounded buffer of decoded images shuffles further.
Rows that are not ok in the index, and ok rows that fail their checks or do not decode, are
skipped and counted (`last_stats` in this process; a warning in the log), never raised.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch

from pipeline.ml.reader import (ArchiveSpec, ImageDecoder, ReadStats, metadata, ok_rows, open_archive,
                                read_shard_rows, split_units)

OUTPUTS = ("numpy", "torch")


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) of torch.distributed when it is initialised, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ArchiveDataset(torch.utils.data.IterableDataset):
    """Samples {"key": str, "image": uint8 (H, W, 3) array or (3, H, W) tensor, "metadata":
    {source, shard, height, width, source_bytes, bpp, psnr}} of an archive's ok images.

    steps=K: previews from the first K coding steps, reading only those bytes of each stream.
    batch_images: streams decoded together (0: 16 on a GPU, 1 on a CPU).
    shuffle: units in a seeded random order and a buffer of `shuffle_buffer` decoded images.
    rank / world_size: this process's place among distributed ranks (default: torch.distributed's).
    transform: applied to each image (after `output`'s conversion) in the worker.
    device: where the workers decode ("cpu", or "cuda" with DataLoader workers started by
    spawn; one GPU model per worker)."""

    def __init__(self, url: str, *, storage_options: Mapping | None = None, model: str | None = None,
                 steps: int | None = None, output: str = "numpy", transform: Callable | None = None,
                 shuffle: bool = False, shuffle_buffer: int = 64, seed: int = 0, batch_images: int = 0,
                 rank: int | None = None, world_size: int | None = None, device: str = "cpu"):
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
        if steps is not None and steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        if shuffle_buffer < 0 or batch_images < 0:
            raise ValueError("shuffle_buffer and batch_images must be >= 0")
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        if world_size is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
        self.spec: ArchiveSpec = open_archive(url, storage_options, model)
        self.steps, self.output, self.transform = steps, output, transform
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, shuffle_buffer, seed
        self.batch_images, self.device = batch_images, device
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.last_stats: ReadStats | None = None  # of the latest iteration in this process

    @property
    def num_images(self) -> int:
        """Ok images in the archive (by its manifest): what one epoch yields over all consumers
        when every stream decodes."""
        return self.spec.ok

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order to produce (with shuffle; as DistributedSampler.set_epoch)."""
        self.epoch = int(epoch)

    def _consumer(self) -> tuple[int, int]:
        """(index, count) of this reader among all ranks x DataLoader workers."""
        rank, ranks = (self.rank, self.world_size) if self.world_size is not None else distributed_rank()
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * workers + worker, ranks * workers

    def units(self, consumer: int, consumers: int) -> list[tuple[str, int, int]]:
        """The work units of one consumer this epoch."""
        units = split_units(self.spec.shards, consumers)
        if self.shuffle:
            random.Random(f"{self.seed}:{self.epoch}").shuffle(units)  # the same order in every consumer
        return units[consumer::consumers]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        consumer, consumers = self._consumer()
        stats = self.last_stats = ReadStats()
        decoder = ImageDecoder(self.spec, self.steps, self.batch_images, self.device)
        archive = self.spec.archive()
        rng = random.Random(f"{self.seed}:{self.epoch}:{consumer}")
        buffer: list[dict[str, Any]] = []
        for shard, part, parts in self.units(consumer, consumers):
            rows = ok_rows(read_shard_rows(self.spec, shard, stats, archive)[part::parts], stats)
            if self.shuffle:
                rng.shuffle(rows)
            for row, rgb in decoder.decode_rows(archive, shard, rows, stats):
                sample = self._sample(row, rgb)
                if not self.shuffle or self.shuffle_buffer <= 1:
                    stats.yielded += 1
                    yield sample
                    continue
                buffer.append(sample)
                if len(buffer) >= self.shuffle_buffer:
                    stats.yielded += 1
                    yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        for sample in buffer:
            stats.yielded += 1
            yield sample

    def _sample(self, row: Mapping[str, Any], rgb: np.ndarray) -> dict[str, Any]:
        image: Any = rgb
        if self.output == "torch":
            image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).contiguous()  # (H, W, 3) -> (3, H, W)
        if self.transform is not None:
            image = self.transform(image)
        return {"key": row["key"], "image": image, "metadata": metadata(row)}


def collate_samples(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """A batch of samples of any sizes: keys and metadata as lists, images stacked when they
    share a shape (a tensor or array), else a list."""
    images = [s["image"] for s in samples]
    if len({tuple(i.shape) for i in images}) == 1:
        images = torch.stack(images) if isinstance(images[0], torch.Tensor) else np.stack(images)
    return {"key": [s["key"] for s in samples], "image": images, "metadata": [s["metadata"] for s in samples]}
