"""Training crops from memory: every training image decoded once, held as uint8, cropped by a
background thread while the model trains.

Decoding an image for every crop (the `stream` loader: data.CropDataset in DataLoader worker
processes) costs a CPU-only machine the cores its training steps need: on the 2-core VM the
workers took about a tenth of the step time. Held in memory, a crop is a slice and at most
one small resize, and a batch of uint8 crops is already in the channels-last layout the
network trains in.

`train_data` names one or more sources; each may carry a sampling weight and a random
downscale range, so one config mixes high-resolution photographs, non-photographic images
and small JPEG-compressed photos whose block artefacts a downscale removes:

    train_data:
      - {url: ../shared/datasets/train2/photos, weight: 0.45}
      - {url: ../shared/datasets/train2/nonphoto, weight: 0.25}
      - {url: ../shared/datasets/train, weight: 0.3, downscale: [0.4, 0.8]}

A plain URL or list of URLs is one source of weight 1 without downscale, as before.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from m2t_core.config import ConfigError
from m2t_core.image_io import load_image
from pipeline.storage.sources import SourceCache, read_source
from pipeline.training.data import MAX_DECODE_PIXELS, list_samples, random_crop

log = logging.getLogger(__name__)

MIN_CROPS_PER_IMAGE = 2  # an image must hold at least this many crop areas after the memory cap


@dataclass(frozen=True)
class SourceSpec:
    """One entry of train_data: where the images are, how often a crop comes from them (weight,
    relative to the other sources) and the range of a random downscale applied once as each
    image is loaded (log-uniform in [lo, hi]; never below what keeps a whole crop inside)."""

    url: Any  # one fsspec URL or a list of them
    weight: float = 1.0
    downscale: tuple[float, float] = (1.0, 1.0)

    @property
    def urls(self) -> list[str]:
        return [self.url] if isinstance(self.url, str) else list(self.url)

    @property
    def is_plain(self) -> bool:
        return self.weight == 1.0 and self.downscale == (1.0, 1.0)


def _url_ok(value: Any) -> bool:
    return (isinstance(value, str) and value != "") or (
        isinstance(value, list) and value != [] and all(isinstance(v, str) and v for v in value))


def parse_sources(value: Any) -> list[SourceSpec]:
    """train_data as SourceSpecs: a URL, a list of URLs (one source), or a list of mappings
    {url, weight, downscale}. Unknown keys and bad values raise ConfigError."""
    if _url_ok(value):
        return [SourceSpec(value)]
    if not isinstance(value, list) or not value:
        raise ConfigError(f"train_data must be a URL, a list of URLs or a list of sources "
                          f"({{url, weight, downscale}}), got {value!r}")
    specs = []
    for entry in value:
        if not isinstance(entry, dict):
            raise ConfigError(f"train_data: mix plain URLs and sources only as {{url: ...}} entries, got {entry!r}")
        unknown = set(entry) - {"url", "weight", "downscale"}
        if unknown:
            raise ConfigError(f"train_data source {entry!r}: unknown keys {sorted(unknown)} (url, weight, downscale)")
        if not _url_ok(entry.get("url")):
            raise ConfigError(f"train_data source {entry!r}: url must be a URL or a list of URLs")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ConfigError(f"train_data source {entry['url']!r}: weight must be a positive number, got {weight!r}")
        scale = entry.get("downscale", [1.0, 1.0])
        if (not isinstance(scale, (list, tuple)) or len(scale) != 2
                or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scale)
                or not 0 < scale[0] <= scale[1] <= 1):
            raise ConfigError(f"train_data source {entry['url']!r}: downscale must be [lo, hi] with "
                              f"0 < lo <= hi <= 1, got {scale!r}")
        specs.append(SourceSpec(entry["url"], float(weight), (float(scale[0]), float(scale[1]))))
    return specs


def sources_to_config(specs: Sequence[SourceSpec]) -> Any:
    """The inverse of parse_sources, for config.yaml and checkpoint info."""
    if len(specs) == 1 and specs[0].is_plain:
        return specs[0].url
    return [{"url": s.url, "weight": s.weight, "downscale": list(s.downscale)} for s in specs]


def _resize(rgb: np.ndarray, factor: float) -> np.ndarray:
    if factor >= 1.0:
        return rgb
    h, w = rgb.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.BICUBIC))


def _read_bytes(sample: str, cache: SourceCache, image_column: str | None) -> bytes | Exception:
    try:
        return read_source(sample, image_column=image_column, cache=cache)
    except Exception as exc:  # recorded as an unreadable image
        return exc


class ImagePool:
    """Decoded training images (uint8 RGB) grouped by source; `batch` draws random crops:
    a source by weight, an image uniformly within it, then data.random_crop (random
    downscale, crop, flip), as the stream loader crops."""

    def __init__(self, groups: list[list[np.ndarray]], weights: Sequence[float], crop: int):
        kept = [(g, w) for g, w in zip(groups, weights) if g]
        if not kept:
            raise ConfigError("no readable training image in train_data")
        self.groups = [g for g, _ in kept]
        total = sum(w for _, w in kept)
        self.weights = np.array([w / total for _, w in kept])
        self.crop = crop

    @property
    def images(self) -> int:
        return sum(len(g) for g in self.groups)

    @property
    def nbytes(self) -> int:
        return sum(im.nbytes for g in self.groups for im in g)

    def batch(self, size: int, rng: np.random.Generator) -> np.ndarray:
        """(size, crop, crop, 3) uint8."""
        out = np.empty((size, self.crop, self.crop, 3), np.uint8)
        for k, g in enumerate(rng.choice(len(self.groups), size=size, p=self.weights)):
            group = self.groups[g]
            out[k] = random_crop(group[int(rng.integers(len(group)))], self.crop, rng)
        return out

    @classmethod
    def load(cls, specs: Sequence[SourceSpec], crop: int, memory_mb: int, seed: int, rank: int = 0,
             world: int = 1, image_column: str | None = None, threads: int = 2) -> "ImagePool":
        """Read every source's images (rank r of `world` takes every world-th image of each
        source), downscale each by its source's random factor, and hold them in at most
        memory_mb: images over an equal share of the budget are downscaled to fit it.
        Unreadable images are logged and skipped."""
        cache = SourceCache()
        lists = []
        for spec in specs:
            samples = list_samples(spec.urls, image_column, cache)[rank::world]
            lists.append(samples)
        count = sum(len(s) for s in lists)
        if count == 0:
            raise ConfigError(f"rank {rank} of {world} has no training image in train_data")
        cap_pixels = memory_mb * 2**20 // 3 // count
        if cap_pixels < MIN_CROPS_PER_IMAGE * crop * crop:
            raise ConfigError(f"memory_mb {memory_mb} cannot hold {count} images at {MIN_CROPS_PER_IMAGE} "
                              f"crops of {crop}x{crop} each: raise memory_mb to at least "
                              f"{math.ceil(count * MIN_CROPS_PER_IMAGE * crop * crop * 3 / 2**20)} "
                              "or use loader: stream")
        rng = np.random.default_rng([seed, rank, 7])
        jobs = [(g, sample, spec, float(rng.uniform(math.log(spec.downscale[0]), math.log(spec.downscale[1]))))
                for g, (spec, samples) in enumerate(zip(specs, lists)) for sample in samples]
        groups: list[list[np.ndarray]] = [[] for _ in specs]
        t0, done, skipped = time.time(), 0, 0

        def decode(job, data):
            g, sample, spec, log_factor = job
            if isinstance(data, Exception):
                return g, sample, data
            try:
                rgb = load_image(data, max_pixels=MAX_DECODE_PIXELS)
            except Exception as exc:  # one bad image never stops training
                return g, sample, exc
            h, w = rgb.shape[:2]
            floor = min(1.0, crop / min(h, w))  # keep a whole crop inside the image
            factor = max(math.exp(log_factor), floor)
            factor = min(factor, max(floor, math.sqrt(cap_pixels / (h * w))))
            return g, sample, np.ascontiguousarray(_resize(rgb, factor))

        # Bytes are read here (SourceCache is not thread-safe), decoded and resized by the
        # threads (Pillow releases the GIL), a chunk at a time so few encoded images wait.
        with ThreadPoolExecutor(max(1, threads)) as pool:
            for start in range(0, count, 64):
                chunk = jobs[start:start + 64]
                futures = [pool.submit(decode, job, _read_bytes(job[1], cache, image_column)) for job in chunk]
                for future in futures:
                    g, sample, rgb = future.result()
                    done += 1
                    if isinstance(rgb, Exception):
                        skipped += 1
                        log.warning("skipping unreadable training image %s: %s", sample, rgb)
                    else:
                        groups[g].append(rgb)
                    if done % max(1, count // 10) == 0 or done == count:
                        log.info("loading training images: %d/%d (%.0f s)", done, count, time.time() - t0)
        cache.close()
        result = cls(groups, [s.weight for s in specs], crop)
        log.info("training pool: %d images (%d unreadable) from %d sources, %.0f MB in memory, %.0f s",
                 result.images, skipped, len(specs), result.nbytes / 2**20, time.time() - t0)
        return result


class BatchStream:
    """An endless iterator of (B, 3, crop, crop) uint8 batches, channels-last in memory, drawn
    from an ImagePool by one background thread (one generator: the sequence does not depend
    on timing). An error in the thread is raised by the next `next()`."""

    _DONE = object()

    def __init__(self, pool: ImagePool, batch_size: int, seed: int, prefetch: int = 2):
        self.pool, self.batch_size = pool, batch_size
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._rng = np.random.default_rng([seed, 11])
        self._thread = threading.Thread(target=self._produce, name="m2t-crops", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                batch = torch.from_numpy(self.pool.batch(self.batch_size, self._rng)).permute(0, 3, 1, 2)  # (B, 3, H, W), NHWC memory
                while not self._stop.is_set():
                    try:
                        self._queue.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # handed to the consumer
            self._queue.put(exc)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise RuntimeError(f"training crops failed: {item}") from item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def __del__(self) -> None:
        self._stop.set()
