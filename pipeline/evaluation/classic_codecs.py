"""Classic image codecs through Pillow, for the evaluation job (pipeline/evaluate.py).

Every codec and its quality sweep is one row of `CODECS` below: the sweep definitions live
there and nowhere else. The sweeps were chosen to cover roughly 0.1-1.5 bpp on Kodak
(768x512 photographs); where a codec cannot go that low (JPEG's floor is ~0.22 bpp at
quality 5), the sweep starts at its lowest useful setting.

* `jpeg-420`, `jpeg-444`: Pillow's JPEG (libjpeg-turbo), baseline, optimised Huffman tables
  off (Pillow's default), chroma 4:2:0 or 4:4:4.
* `webp`: libwebp, `method=6` (slowest, best).
* `avif`: libavif with the AOM encoder built into Pillow >= 11.3, YUV 4:4:4 (what RGB-PSNR
  comparisons usually use), full range, `speed=6` (libavif's default).
* `jpeg2000`: OpenJPEG, 9/7 irreversible wavelet, RGB->YCC (mct=1), raw codestream (.j2k:
  no JP2 boxes), one quality layer at a target rate: OpenJPEG's compression ratio is against
  24 bits per pixel, so the ratio for a target of B bpp is 24 / B. The sweep is in bpp.
* `jxl`: libjxl through `pillow-jxl-plugin`, `effort=7` (libjxl's default). Qualities below 20
  are left out: there libjxl's PSNR stops improving with rate on photographs.

Encoders and decoders run on `threads` threads (the job's `codec_threads`, default 1) so that
timings compare with our models, which code on one thread per CPU task.

`bpp` is always 8 * len(encoded bytes) / pixels of the original; each decode is checked to
give back an image of the original size.
"""

from __future__ import annotations

import contextlib
import io
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import numpy as np

# Names accepted on the command line for groups of codecs.
BASELINE_ALIASES = {"jpeg": ("jpeg-420", "jpeg-444"), "j2k": ("jpeg2000",), "jpegxl": ("jxl",)}
ALL_BASELINES = ("jpeg", "webp", "avif", "jpeg2000", "jxl")


@dataclass(frozen=True)
class ClassicCodec:
    name: str  # the codec's name in every output: "jpeg-420"
    label: str  # for plots and the report
    pil_format: str  # Pillow's format name for save()
    param: str  # what the sweep varies: "quality" (the encoder's own scale) or "target_bpp"
    sweep: tuple[float, ...]  # in increasing rate
    save_args: Mapping[str, Any] = field(default_factory=dict)  # fixed encoder settings
    package: str | None = None  # the pip package that provides the format, if not Pillow itself
    module: str | None = None  # imported to register the format with Pillow
    cost: float = 0.01  # rough seconds per image and rate point at Kodak size (work ordering)

    def save_kwargs(self, value: float, threads: int) -> dict[str, Any]:
        kwargs = dict(self.save_args)
        if self.param == "target_bpp":  # JPEG 2000: one layer at compression ratio 24 / bpp
            kwargs["quality_layers"] = [24.0 / float(value)]
        else:
            kwargs[self.param] = int(value)
        if self.pil_format == "AVIF":
            kwargs["max_threads"] = threads
        elif self.pil_format == "JXL":
            kwargs["num_threads"] = threads
        return kwargs

    def point_label(self, value: float) -> str:
        return f"bpp={value:g}" if self.param == "target_bpp" else f"q={value:g}"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label, "format": self.pil_format, "param": self.param,
                "sweep": list(self.sweep), "settings": dict(self.save_args), "package": self.package,
                "library": library_version(self)}


# The one table of classic codecs and their sweeps.
CODECS: dict[str, ClassicCodec] = {c.name: c for c in (
    ClassicCodec("jpeg-420", "JPEG 4:2:0", "JPEG", "quality", (5, 10, 15, 20, 30, 40, 50, 60, 70, 80),
                 {"subsampling": "4:2:0"}, cost=0.02),
    ClassicCodec("jpeg-444", "JPEG 4:4:4", "JPEG", "quality", (5, 10, 15, 20, 30, 40, 50, 60, 70),
                 {"subsampling": "4:4:4"}, cost=0.02),
    ClassicCodec("webp", "WebP", "WEBP", "quality", (0, 2, 5, 10, 20, 30, 40, 50, 65, 80),
                 {"method": 6}, cost=0.1),
    ClassicCodec("avif", "AVIF", "AVIF", "quality", (5, 10, 15, 20, 30, 40, 50, 60, 70),
                 {"subsampling": "4:4:4", "speed": 6, "range": "full", "codec": "aom"}, cost=0.4),
    ClassicCodec("jpeg2000", "JPEG 2000", "JPEG2000", "target_bpp",
                 (0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5),
                 {"quality_mode": "rates", "irreversible": True, "mct": 1, "no_jp2": True}, cost=0.1),
    ClassicCodec("jxl", "JPEG XL", "JXL", "quality", (5, 20, 30, 40, 50, 60, 70, 80, 85),
                 {"effort": 7}, package="pillow-jxl-plugin", module="pillow_jxl", cost=0.25),
)}


class CodecUnavailableError(RuntimeError):
    """A codec cannot run here (its Pillow plugin or library is missing)."""


def expand_baselines(names) -> list[str]:
    """Codec names from what a user wrote: "all", "none", aliases ("jpeg" = both JPEGs), a
    comma-separated string or a list. Unknown names raise ValueError."""
    if names is None:
        return []
    if isinstance(names, str):
        names = [n for n in (p.strip() for p in names.split(",")) if n]
    out: list[str] = []
    for name in names:
        name = str(name).strip().lower()
        if name == "none":
            continue
        targets = [n for a in ALL_BASELINES for n in BASELINE_ALIASES.get(a, (a,))] if name == "all" \
            else BASELINE_ALIASES.get(name, (name,))
        for target in targets:
            if target not in CODECS:
                known = ", ".join(list(CODECS) + [a for a in BASELINE_ALIASES if a not in CODECS])
                raise ValueError(f"unknown baseline codec {name!r} (known: {known}, all, none)")
            if target not in out:
                out.append(target)
    return out


def ensure_available(codec: ClassicCodec) -> None:
    """Raise CodecUnavailableError naming the codec and what to install if it cannot encode here."""
    from PIL import Image, features

    if codec.module:
        try:
            __import__(codec.module)
        except ImportError as exc:
            raise CodecUnavailableError(
                f"codec {codec.name} needs the package {codec.package} (pip install {codec.package}): {exc}") from None
    feature = {"JPEG": "jpg", "WEBP": "webp", "AVIF": "avif", "JPEG2000": "jpg_2000"}.get(codec.pil_format)
    if feature and not features.check(feature):
        raise CodecUnavailableError(f"codec {codec.name}: this Pillow ({Image.__version__}) was built without "
                                    f"{codec.pil_format} support")
    if codec.pil_format == "AVIF" and codec.save_args.get("codec", "auto") != "auto":
        from PIL import _avif

        if not _avif.encoder_codec_available(codec.save_args["codec"]):
            raise CodecUnavailableError(f"codec {codec.name}: libavif here has no {codec.save_args['codec']} encoder")
    if codec.pil_format not in Image.SAVE:
        Image.init()
        if codec.pil_format not in Image.SAVE:
            raise CodecUnavailableError(f"codec {codec.name}: Pillow cannot save {codec.pil_format}")


def library_version(codec: ClassicCodec) -> str:
    """The library behind a codec, with its version, for the report."""
    from PIL import Image, features

    if codec.package:
        try:
            from importlib.metadata import version

            return f"{codec.package} {version(codec.package)}"
        except Exception:
            return f"{codec.package} (not installed)"
    feature = {"JPEG": "jpg", "WEBP": "webp", "AVIF": "avif", "JPEG2000": "jpg_2000"}[codec.pil_format]
    name = {"jpg": "libjpeg", "webp": "libwebp", "avif": "libavif", "jpg_2000": "OpenJPEG"}[feature]
    version_text = features.version(feature)
    if feature == "jpg" and features.check_feature("libjpeg_turbo"):
        name, version_text = "libjpeg-turbo", features.version_feature("libjpeg_turbo")
    extra = ""
    if codec.pil_format == "AVIF":
        try:
            from PIL import _avif

            extra = f" ({_avif.codec_versions()})"
        except Exception:
            pass
    return f"Pillow {Image.__version__}, {name} {version_text}{extra}"


@contextlib.contextmanager
def decoder_threads(threads: int) -> Iterator[None]:
    """Limit the AVIF and JPEG XL decoders' threads (module settings of their Pillow plugins)."""
    saved = []
    try:
        from PIL import AvifImagePlugin

        saved.append((AvifImagePlugin, "DEFAULT_MAX_THREADS", AvifImagePlugin.DEFAULT_MAX_THREADS))
        AvifImagePlugin.DEFAULT_MAX_THREADS = threads
    except ImportError:
        pass
    try:
        from pillow_jxl import JpegXLImagePlugin

        saved.append((JpegXLImagePlugin, "DECODE_THREADS", JpegXLImagePlugin.DECODE_THREADS))
        JpegXLImagePlugin.DECODE_THREADS = 0 if threads <= 1 else threads  # 0: no parallelism
    except ImportError:
        pass
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def encode(codec: ClassicCodec, rgb: np.ndarray, value: float, threads: int = 1) -> tuple[bytes, float]:
    """(encoded bytes, seconds). Raises whatever the encoder raises (e.g. an image too large
    for the format)."""
    from PIL import Image

    image = Image.fromarray(rgb, "RGB")
    buf = io.BytesIO()
    t0 = time.perf_counter()
    image.save(buf, format=codec.pil_format, **codec.save_kwargs(value, threads))
    return buf.getvalue(), time.perf_counter() - t0


def decode(codec: ClassicCodec, data: bytes, height: int, width: int, threads: int = 1) -> tuple[np.ndarray, float]:
    """(RGB uint8 (H, W, 3), seconds). Raises ValueError if the decoder gives another size."""
    from PIL import Image

    with decoder_threads(threads):
        t0 = time.perf_counter()
        with Image.open(io.BytesIO(data), formats=[codec.pil_format]) as image:
            image.load()
            rgb = np.asarray(image.convert("RGB") if image.mode != "RGB" else image)
        seconds = time.perf_counter() - t0
    if rgb.shape != (height, width, 3):
        raise ValueError(f"decoded image is {rgb.shape[1]}x{rgb.shape[0]}, the original {width}x{height}")
    return rgb, seconds
