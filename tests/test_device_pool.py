"""DeviceBatches (pipeline/training/device_pool.py): crops cut on the training device from an
ImagePool's images, drawn by source weight, deterministic for a seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.training.device_pool import DeviceBatches
from pipeline.training.pool import ImagePool


def noise_images(rng, sizes, lo=0, hi=256):
    return [rng.integers(lo, hi, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def mixed_pool(crop=16):
    rng = np.random.default_rng(5)
    # Two sizes shared by several images (stacked) and one of its own, across two sources.
    first = noise_images(rng, [(40, 48)] * 3 + [(33, 61)])
    second = noise_images(rng, [(40, 48)] * 2 + [(24, 24)])
    return ImagePool([first, second], [0.5, 0.5], crop)


def test_batches_shape_dtype_layout_and_nbytes():
    pool = mixed_pool()
    batches = DeviceBatches(pool, 12, seed=0, device="cpu")
    batch = next(batches)
    assert batch.shape == (12, 3, 16, 16) and batch.dtype == torch.uint8 and batch.device.type == "cpu"
    assert batch.is_contiguous(memory_format=torch.channels_last)
    assert batches.nbytes == pool.nbytes and batches.images == 7
    assert iter(batches) is batches
    batches.close()


def test_same_seed_same_crops_other_seed_other_crops():
    pool = mixed_pool()
    a, b, c = (DeviceBatches(pool, 8, seed=s, device="cpu") for s in (3, 3, 4))
    for _ in range(3):
        x, y, z = next(a), next(b), next(c)
        assert torch.equal(x, y)
        assert not torch.equal(x, z)


def test_crops_are_windows_of_the_source_images_flipped_or_not():
    pool = mixed_pool()
    images = [im for g in pool.groups for im in g]
    batches, twin = DeviceBatches(pool, 32, seed=1, device="cpu"), DeviceBatches(pool, 32, seed=1, device="cpu")
    flips, tops, seen = [], [], set()
    for _ in range(4):
        plan = twin.draw()
        batch = next(batches).permute(0, 2, 3, 1).numpy()  # (B, c, c, 3)
        for k in range(32):
            i, top, left, flip = (int(plan[key][k]) for key in ("image", "top", "left", "flip"))
            window = images[i][top:top + 16, left:left + 16]
            np.testing.assert_array_equal(batch[k], window[:, ::-1] if flip else window, err_msg=f"crop {k}")
            assert 0 <= top <= images[i].shape[0] - 16 and 0 <= left <= images[i].shape[1] - 16
            flips.append(flip)
            tops.append(top)
            seen.add(i)
    assert 0.3 < np.mean(flips) < 0.7 and len(set(tops)) > 5
    assert seen == set(range(len(images)))  # every image, of every size, is drawn


def test_sources_by_weight_images_uniform_within():
    rng = np.random.default_rng(0)
    dark, light = noise_images(rng, [(20, 20)] * 4, 0, 100), noise_images(rng, [(20, 20)] * 2, 150, 256)
    batches = DeviceBatches(ImagePool([dark, light], [4, 1], 8), 50, seed=2, device="cpu")
    crops = torch.cat([next(batches) for _ in range(40)])  # 2000 crops
    from_dark = (crops.amax(dim=(1, 2, 3)) < 100).float().mean().item()
    assert 0.76 < from_dark < 0.84  # weight 4:1
    counts = np.bincount(np.concatenate([batches.draw()["image"] for _ in range(40)]), minlength=6)
    assert counts[:4].min() > 0.8 * counts[:4].mean() and counts[4:].min() > 0.8 * counts[4:].mean()


def test_image_smaller_than_the_crop_is_refused_by_index_and_size():
    rng = np.random.default_rng(0)
    pool = ImagePool([noise_images(rng, [(40, 40)] * 2), noise_images(rng, [(40, 40), (40, 12)])], [1, 1], 16)
    with pytest.raises(ValueError, match=r"image 3 is 12x40, smaller than the 16x16 crop"):
        DeviceBatches(pool, 4, seed=0, device="cpu")
    assert next(DeviceBatches(pool, 4, seed=0, device="cpu", crop=12)).shape == (4, 3, 12, 12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_equal_cpu_batches():
    pool = mixed_pool()
    on_cpu, on_gpu = DeviceBatches(pool, 16, seed=7, device="cpu"), DeviceBatches(pool, 16, seed=7, device="cuda")
    for _ in range(3):
        batch = next(on_gpu)
        assert batch.device.type == "cuda" and batch.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(batch.cpu(), next(on_cpu))
