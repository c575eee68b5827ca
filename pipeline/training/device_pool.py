"""Training crops cut on the training device: every image of an ImagePool uploaded once as
uint8, each batch gathered there, so a GPU's steps never wait for a CPU thread or a host
copy of pixels.

Meant for packs of pre-scaled tiles (pack.py): a crop is a uniform window of a tile and a
random horizontal flip, with no resizing (the tiles already carry the random downscale).
The draws (source by weight, image uniformly within it, offset, flip) come from a seeded
numpy Generator on the CPU, so the sequence of crops depends on the seed only, not on the
device. Images of one size share one (N, H, W, 3) tensor, and the crops of a batch that come
from it are cut by one indexed gather instead of a kernel per crop.
"""

from __future__ import annotations

import warnings
from typing import Iterator

import numpy as np
import torch

from pipeline.training.pool import ImagePool


class DeviceBatches:
    """An endless iterator of (B, 3, crop, crop) uint8 batches on `device`, channels-last in
    memory (the layout BatchStream yields and the network trains in)."""

    def __init__(self, pool: ImagePool, batch_size: int, seed: int, device: torch.device | str,
                 crop: int | None = None):
        self.batch_size, self.device = batch_size, torch.device(device)
        self.crop = pool.crop if crop is None else crop
        if batch_size <= 0 or self.crop <= 0:
            raise ValueError(f"batch_size and crop must be positive, got {batch_size} and {self.crop}")
        self.weights = np.asarray(pool.weights, np.float64)
        images = [im for group in pool.groups for im in group]
        self._group_start = np.cumsum([0] + [len(g) for g in pool.groups])[:-1]
        self._group_size = np.array([len(g) for g in pool.groups])
        for index, im in enumerate(images):
            if im.ndim != 3 or im.shape[2] != 3 or im.dtype != np.uint8:
                raise ValueError(f"image {index}: expected uint8 (H, W, 3), got {im.dtype} {im.shape}")
            if min(im.shape[:2]) < self.crop:
                raise ValueError(f"image {index} is {im.shape[1]}x{im.shape[0]}, smaller than the "
                                 f"{self.crop}x{self.crop} crop")
        self._heights = np.array([im.shape[0] for im in images])
        self._widths = np.array([im.shape[1] for im in images])
        # One device tensor per image size; image i is row _row[i] of stack _stack_of[i].
        sizes = sorted({im.shape[:2] for im in images})
        stack_of_size = {size: s for s, size in enumerate(sizes)}
        self._stack_of = np.array([stack_of_size[im.shape[:2]] for im in images])
        self._row = np.zeros(len(images), np.int64)
        self._stacks = []
        for s, (h, w) in enumerate(sizes):
            members = np.flatnonzero(self._stack_of == s)
            stack = torch.empty((len(members), h, w, 3), dtype=torch.uint8, device=self.device)
            for row, index in enumerate(members):
                with warnings.catch_warnings():  # read-only decoded arrays are only read here
                    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                    stack[row].copy_(torch.from_numpy(images[index]))
                self._row[index] = row
            self._stacks.append(stack)
        self._span = torch.arange(self.crop, device=self.device)
        self._rng = np.random.default_rng([seed, 17])

    @property
    def nbytes(self) -> int:
        """Device memory held by the images."""
        return sum(s.numel() * s.element_size() for s in self._stacks)

    @property
    def images(self) -> int:
        return len(self._row)

    def draw(self) -> dict[str, np.ndarray]:
        """The next batch's crops: image index (over all groups, in order), top, left, flip."""
        b, rng = self.batch_size, self._rng
        group = rng.choice(len(self.weights), size=b, p=self.weights)
        image = self._group_start[group] + rng.integers(0, self._group_size[group])
        top = rng.integers(0, self._heights[image] - self.crop + 1)
        left = rng.integers(0, self._widths[image] - self.crop + 1)
        flip = rng.random(b) < 0.5
        return {"image": image, "top": top, "left": left, "flip": flip}

    def cut(self, plan: dict[str, np.ndarray]) -> torch.Tensor:
        """The crops `plan` names, as one (B, 3, crop, crop) channels-last uint8 tensor."""
        c, b = self.crop, len(plan["image"])
        stack_ids = self._stack_of[plan["image"]]
        params = np.stack([self._row[plan["image"]], plan["top"], plan["left"], plan["flip"], stack_ids])
        rows, tops, lefts, flips, _ = torch.from_numpy(params.astype(np.int64)).to(self.device).unbind(0)
        ys = tops[:, None] + self._span  # (B, c)
        # A flipped crop reads its window's columns right to left.
        xs = lefts[:, None] + torch.where(flips[:, None].bool(), c - 1 - self._span, self._span)
        used = np.unique(stack_ids)
        if len(used) == 1:
            out = self._stacks[used[0]][rows[:, None, None], ys[:, :, None], xs[:, None, :]]
        else:
            out = torch.empty((b, c, c, 3), dtype=torch.uint8, device=self.device)
            for s in used:
                pick = torch.from_numpy(np.flatnonzero(stack_ids == s)).to(self.device)
                out[pick] = self._stacks[s][rows[pick, None, None], ys[pick, :, None], xs[pick, None, :]]
        return out.permute(0, 3, 1, 2)  # (B, 3, c, c) over NHWC memory: channels-last

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        return self.cut(self.draw())

    def close(self) -> None:
        """Nothing runs in the background; here so a trainer closes either loader alike."""
