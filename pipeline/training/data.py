"""Training data: every input `m2t compress` accepts, as samples; random crops; the Dataset and
sampler of the training loop; validation images.

A sample is an input's source string (pipeline/storage/sources.py): an image file's URL,
`TAR_URL#member` or `PARQUET_URL#row=N`, listed by sources.list_sources and read back by
sources.read_source, so folders and globs of images, webdataset .tar shards and Parquet files
(image and key columns found as compress finds them) work on any fsspec URL.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from m2t_core.image_io import load_image
from pipeline.storage.sources import SourceCache, list_sources, read_source

log = logging.getLogger(__name__)

MAX_DECODE_PIXELS = 100_000_000  # refuse decompression bombs before decoding their pixels
VAL_MAX_SIDE = 512


def list_samples(urls: str | Sequence[str], image_column: str | None = None,
                 cache: SourceCache | None = None) -> list[str]:
    """Every input under `urls` (image files, image members of .tar shards, Parquet rows), in
    plan order. Tars are indexed here (headers only); with a cache, their indexes stay in it.
    A damaged tar is logged and keeps the members before the damage. Raises SourceError
    when an input is missing or holds nothing to train on."""
    samples, problems = list_sources(urls, image_column=image_column, cache=cache)
    for problem in problems:
        log.warning("%s", problem)
    return samples


def read_sample(sample: str, cache: SourceCache | None = None, image_column: str | None = None) -> np.ndarray:
    """The RGB pixels of one sample; decompression bombs are refused before decoding."""
    return load_image(read_source(sample, image_column=image_column, cache=cache), max_pixels=MAX_DECODE_PIXELS)


def random_crop(rgb: np.ndarray, crop: int, rng: np.random.Generator) -> np.ndarray:
    """Random downscale, random crop x crop, random horizontal flip.

    The scale is log-uniform between "short side = crop" and 1, so crops see both native
    detail and whole-image structure. Images smaller than the crop are upscaled to fit
    (rare in photo collections; better a soft crop than a lost image). Resizing only the
    crop's source box keeps large images cheap.
    """
    h, w = rgb.shape[:2]
    lo = crop / min(h, w)
    scale = lo if lo >= 1.0 else math.exp(rng.uniform(math.log(lo), 0.0))
    side = min(max(crop, round(crop / scale)), h, w) if lo < 1.0 else min(h, w)  # source box side
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    box = rgb[top:top + side, left:left + side]
    if side != crop:
        box = np.array(Image.fromarray(box).resize((crop, crop), Image.BICUBIC))
    if rng.random() < 0.5:
        box = box[:, ::-1]
    return np.ascontiguousarray(box)


class CropDataset(torch.utils.data.Dataset):
    """Random crops as uint8 (3, crop, crop) tensors; unreadable samples are skipped with a warning.

    Each process (a DataLoader worker) reads through its own copy of `cache`, so the tar
    indexes listed with it are not scanned again and a tar or Parquet file stays open
    between crops (SourceCache's bounds: a few open files, one row group each)."""

    MAX_TRIES = 64

    def __init__(self, samples: list[str], crop_size: int, seed: int = 0, image_column: str | None = None,
                 cache: SourceCache | None = None):
        self.samples = samples
        self.crop = crop_size
        self.seed = seed
        self.image_column = image_column
        self.cache = cache if cache is not None else SourceCache()
        self._bad: set[int] = set()
        self._rng: np.random.Generator | None = None
        self._rng_pid = -1

    def __len__(self) -> int:
        return len(self.samples)

    def _generator(self) -> np.random.Generator:
        # One generator per process: DataLoader workers get distinct torch seeds, derive from them.
        if self._rng is None or self._rng_pid != os.getpid():
            self._rng = np.random.default_rng([self.seed, torch.initial_seed() % 2**63])
            self._rng_pid = os.getpid()
        return self._rng

    def __getitem__(self, index: int) -> torch.Tensor:
        rng = self._generator()
        for attempt in range(self.MAX_TRIES):
            i = index if attempt == 0 else int(rng.integers(len(self.samples)))
            if i in self._bad:
                continue
            try:
                rgb = read_sample(self.samples[i], self.cache, self.image_column)
            except Exception as exc:  # any unreadable sample: skip it, never stop training
                self._bad.add(i)
                log.warning("skipping unreadable training image %s: %s", self.samples[i], exc)
                continue
            return torch.from_numpy(random_crop(rgb, self.crop, rng)).permute(2, 0, 1).contiguous()  # NCHW
        raise RuntimeError(f"no readable image in {self.MAX_TRIES} tries: is the training data corrupt?")


class InfiniteSampler(torch.utils.data.Sampler[int]):
    """Endless reshuffled passes over the dataset; rank r of `world` takes every world-th index
    of the same permutation, so ranks see disjoint images in each pass. Endless, so workers
    never drain and restart at epoch boundaries."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1):
        if n < world:
            raise ValueError(f"{n} training images cannot be split over {world} workers")
        self.n, self.seed, self.rank, self.world = n, seed, rank, world

    def __iter__(self) -> Iterator[int]:
        epoch = 0
        while True:
            g = torch.Generator().manual_seed(self.seed + epoch)
            yield from torch.randperm(self.n, generator=g)[self.rank::self.world].tolist()
            epoch += 1


def centre_crop(rgb: np.ndarray, max_side: int | None) -> np.ndarray:
    """The centre max_side x max_side (at most) of an image; None: the whole image."""
    if not max_side:
        return rgb
    h, w = rgb.shape[:2]
    ch, cw = min(h, max_side), min(w, max_side)
    top, left = (h - ch) // 2, (w - cw) // 2
    return np.ascontiguousarray(rgb[top:top + ch, left:left + cw])


def load_val_images(urls: str | Sequence[str] | None, count: int, image_column: str | None = None) -> list[np.ndarray]:
    """The first `count` readable images, center-cropped to at most 512 x 512."""
    images: list[np.ndarray] = []
    if not urls or count == 0:
        return images
    cache = SourceCache()
    for sample in list_samples(urls, image_column, cache):
        try:
            rgb = read_sample(sample, cache, image_column)
        except Exception as exc:
            log.warning("skipping unreadable validation image %s: %s", sample, exc)
            continue
        images.append(centre_crop(rgb, VAL_MAX_SIDE))
        if len(images) == count:
            break
    cache.close()
    return images
