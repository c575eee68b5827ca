"""`make demo`: compress, decompress and verify a few real photographs with the shipped model.

The photos ship inside scikit-image, so the demo needs no download and no ../shared.
Prints bpp and PSNR per image, checks that the decoder reproduces the encoder's
reconstruction (`Encoder(model, reconstruct=True)`) bit for bit, and compares with JPEG
(Pillow) at a similar rate.

Then it runs the dataset job (pipeline/jobs/compress.py) on the same photos written to a
temporary folder: a local Ray cluster, an archive in a temporary folder, the job's report,
and one image fetched back by key (`m2t get`), checked against the table above.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from m2t_core import DEFAULT_MODEL, Decoder, Encoder, load_model  # noqa: E402
from m2t_core.metrics import bits_per_pixel, psnr  # noqa: E402


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


def run_dataset_job(photos: dict[str, np.ndarray], model_name: str | None, use_ray: bool,
                    expected_crc: dict[str, int]) -> int:
    """The compression job on the photos as a tiny corpus; returns its exit code (or 1 if the
    archived images differ from what the codec gave above)."""
    from pipeline.storage.archive import get_image
    from pipeline.jobs.compress import EXIT_OK, CompressConfig, RayOptions, compress_dataset, format_report

    with tempfile.TemporaryDirectory(prefix="m2t-demo-") as tmp:
        corpus, archive = Path(tmp) / "photos", Path(tmp) / "photos.m2t"
        corpus.mkdir()
        for name, rgb in photos.items():
            Image.fromarray(rgb).save(corpus / f"{name}.png")
        print(f"\ncompression job: {len(photos)} PNG files in {corpus} -> {archive} "
              f"({'Ray, local cluster' if use_ray else 'in-process'})")
        # One image per shard, so that both CPUs' actors get work.
        cfg = CompressConfig(input=str(corpus), output=str(archive), model=model_name or DEFAULT_MODEL,
                             shard_size=1, ray=RayOptions(enabled=use_ray))
        report, code = compress_dataset(cfg)
        print(format_report(report))
        # Random access: one index lookup and one byte range, decoded.
        name = next(iter(photos))
        t0 = time.perf_counter()
        rgb = get_image(str(archive), f"{name}.png")
        same = zlib.crc32(rgb.tobytes()) == expected_crc[name]
        print(f"get {name}.png: {rgb.shape[1]}x{rgb.shape[0]} in {time.perf_counter() - t0:.2f} s, "
              f"{'identical to' if same else 'DIFFERENT from'} the decoded image above")
        # The verify job decodes every bitstream of the archive and checks every checksum.
        from pipeline.jobs.verify import verify_main

        print(f"\nverify job: {archive}")
        verify_args = [str(archive), "--no-progress", "--report", str(Path(tmp) / "verify.json")]
        verify_code = verify_main(verify_args + ([] if use_ray else ["--no-ray"]))
    if code != EXIT_OK:
        print(f"ERROR: the compression job exited with code {code}", file=sys.stderr)
        return code
    if verify_code != 0:
        print(f"ERROR: the verify job exited with code {verify_code}", file=sys.stderr)
        return verify_code
    return 0 if same else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="registry name or checkpoint (default model if omitted)")
    parser.add_argument("--skip-job", action="store_true", help="only the per-image table, not the dataset job")
    parser.add_argument("--no-ray", action="store_true", help="run the dataset job in this process")
    args = parser.parse_args(argv)
    model = load_model(args.model)
    print(f"model {model.model_id} ({model.cfg.mode}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), CPU")
    header = f"{'image':<16}{'size':>10}{'bytes':>8}{'bpp':>8}{'PSNR':>8}{'enc s':>7}{'dec s':>7}  exact  {'JPEG bpp':>8}{'PSNR':>7}"
    print(header)
    print("-" * len(header))
    ok = True
    rows = []
    decoded_crc: dict[str, int] = {}
    photos = sample_photos()
    encoder, decoder = Encoder(model), Decoder(model)
    reconstructing = Encoder(model, reconstruct=True)  # also runs g_s: not timed as the encode
    for name, rgb in photos.items():
        t0 = time.perf_counter()
        enc = encoder.encode_image(rgb)
        t1 = time.perf_counter()
        decoded = decoder.decompress(enc.bitstream)
        t2 = time.perf_counter()
        again = reconstructing.encode_image(rgb)
        exact = again.bitstream == enc.bitstream and np.array_equal(decoded, again.x_hat)
        decoded_crc[name] = zlib.crc32(decoded.tobytes())
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
        print("ERROR: a decoded image differs from the encoder's reconstruction (or the encoder "
              "wrote two different streams for one image)", file=sys.stderr)
        return 1
    if args.skip_job:
        return 0
    return run_dataset_job(photos, args.model, not args.no_ray, decoded_crc)


if __name__ == "__main__":
    sys.exit(main())
