"""`make demo`: compress and decompress a few real photographs with the shipped model.

The photos ship inside scikit-image, so the demo needs no download and no ../shared.
Prints bpp and PSNR per image, checks that the decoder reproduces the encoder's
reconstruction bit for bit, and compares with JPEG (Pillow) at a similar rate.
"""

from __future__ import annotations

import argparse
import io
import sys
import time

import numpy as np
from PIL import Image

from m2t_core import load_model
from m2t_core.metrics import bits_per_pixel, psnr



def sample_photos() -> dict[str, np.ndarray]:
    """Colour photographs stored inside the scikit-image wheel (no download)."""
    from skimage import data

    photos = {
        "astronaut": data.astronaut(),
        "coffee": data.coffee(),
        "chelsea": data.chelsea(),
        "rocket": data.rocket(),
        "motorcycle": data.stereo_motorcycle()[0],
    }
    return {name: np.ascontiguousarray(img[..., :3]) for name, img in photos.items()}


def jpeg_at_rate(rgb: np.ndarray, target_bpp: float) -> tuple[float, float, int]:
    """The JPEG quality (4:2:0) whose rate is closest to target_bpp -> (bpp, psnr, quality)."""
    best = None
    for quality in range(5, 96, 5):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=quality, subsampling=2)
        bpp = bits_per_pixel(buf.tell(), *rgb.shape[:2])
        if best is None or abs(bpp - target_bpp) < abs(best[0] - target_bpp):
            decoded = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
            best = (bpp, psnr(rgb, decoded), quality)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="registry name or checkpoint (default model if omitted)")
    args = parser.parse_args(argv)
    model = load_model(args.model)
    print(f"model {model.model_id} ({model.cfg.mode}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), CPU")
    header = f"{'image':<16}{'size':>10}{'bytes':>8}{'bpp':>8}{'PSNR':>8}{'enc s':>7}{'dec s':>7}  exact  {'JPEG bpp':>8}{'PSNR':>7}"
    print(header)
    print("-" * len(header))
    ok = True
    rows = []
    for name, rgb in sample_photos().items():
        t0 = time.perf_counter()
        enc = model.encode_image(rgb)
        t1 = time.perf_counter()
        decoded = model.decompress(enc.bitstream)
        t2 = time.perf_counter()
        exact = np.array_equal(decoded, model.reconstruct(enc))
        ok &= exact
        q = psnr(rgb, decoded)
        jb, jp, _ = jpeg_at_rate(rgb, enc.bpp)
        rows.append((enc.bpp, q))
        h, w = rgb.shape[:2]
        print(f"{name:<16}{f'{w}x{h}':>10}{len(enc.bitstream):>8}{enc.bpp:>8.3f}{q:>8.2f}{t1 - t0:>7.2f}{t2 - t1:>7.2f}  "
              f"{'yes' if exact else 'NO':<5}  {jb:>8.3f}{jp:>7.2f}")
    mean_bpp, mean_psnr = (float(np.mean(c)) for c in zip(*rows))
    print(f"{'mean':<16}{'':>10}{'':>8}{mean_bpp:>8.3f}{mean_psnr:>8.2f}")
    if not ok:
        print("ERROR: a decoded image differs from the encoder's reconstruction", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
