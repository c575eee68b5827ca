"""Baselines: the codecs our models are measured against, behind one interface (`Baseline`).

Used by the evaluation job (`m2t eval`, pipeline/evaluation/evaluate.py) and by the benchmarks
(bench/peer_speed.py). Every baseline and its rate sweep is one row of `BASELINES` below: the
sweep definitions live there and nowhere else. A baseline codes a uint8 RGB array (H, W, 3) to
the bytes it would store (`encode`) and those bytes back to the array (`decode`); the caller
times both, so every codec's time covers the same work, array to bytes and back.

Classic codecs, through Pillow (`PillowBaseline`). Their sweeps cover roughly 0.1-1.5 bpp on
Kodak (768x512 photographs); where a codec cannot go that low (JPEG's floor is ~0.22 bpp at
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

Learned codecs, through CompressAI (`CompressAIBaseline`), opt-in by name (`all` means the
Pillow codecs): `compressai-bmshj2018-hyperprior` (Balle et al. 2018) and `compressai-mbt2018`
(Minnen et al. 2018, autoregressive), MSE-trained, qualities 1..8 (CompressAI's ladder). The
image is zero-padded to a multiple of 64 and the output cropped back, as CompressAI's own
evaluation does; the model's real `compress` / `decompress` (range coding included) run on the
CPU. The bytes are the model's entropy-coded strings (y, then z) behind a 5-byte frame (the
quality, which names the model that decodes them, and y's length). CompressAI is not a project
dependency (`pip install compressai` pulls a CUDA torch): see `COMPRESSAI_INSTALL`. Pretrained
weights are read only from torch hub's cache (`torch.hub.get_dir()/checkpoints`, where
CompressAI's zoo keeps them): this project never downloads at run time, so a missing file is a
CodecUnavailableError naming the file, where CompressAI publishes it and that folder. The
benchmarks time random-init models instead (`random_init()`), which need no files.

Encoders and decoders run on `threads` threads (the job's `codec_threads`, default 1) so that
timings compare with our models, which code on one thread per CPU task. `bpp` is always
8 * len(encoded bytes) / pixels of the original; each decode is checked to give back an image
of the original size.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import io
import os
import struct
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import numpy as np

# Names accepted on the command line for groups of codecs.
BASELINE_ALIASES = {"jpeg": ("jpeg-420", "jpeg-444"), "j2k": ("jpeg2000",), "jpegxl": ("jxl",),
                    "compressai": ("compressai-bmshj2018-hyperprior", "compressai-mbt2018")}
ALL_BASELINES = ("jpeg", "webp", "avif", "jpeg2000", "jxl")  # what "all" means: CompressAI is opt-in by name

# CompressAI without its dependencies (they would replace the CPU torch with a CUDA build);
# the Makefile's COMPRESSAI_SPEC (`make bench-peers`) is the same list.
COMPRESSAI_INSTALL = ("pip install --no-deps compressai==1.2.8 einops torch-geometric psutil pyparsing xxhash "
                      "pytorch-msssim torchvision==0.28.0   (or: make bench-peers)")
FRAME = ">BI"  # a CompressAI baseline's stream: quality (which model decodes it), y string's length; y; z


class CodecUnavailableError(RuntimeError):
    """A codec cannot run here (its Pillow plugin, library or weights are missing)."""


class Baseline(abc.ABC):
    """A codec our models are compared with. Subclasses are frozen dataclasses with these fields."""

    name: str  # the codec's name in every output: "jpeg-420"
    label: str  # for plots and the report
    param: str  # what the sweep varies: "quality" (the encoder's own scale) or "target_bpp"
    sweep: tuple[float, ...]  # in increasing rate
    cost: float  # rough seconds per image and rate point at Kodak size (work ordering)
    kind: str  # the rows' `kind`: "classic" or "learned"

    @abc.abstractmethod
    def ensure_available(self) -> None:
        """Raise CodecUnavailableError naming the codec and what to install if it cannot run here."""

    @abc.abstractmethod
    def encode(self, rgb: np.ndarray, value: float, threads: int = 1) -> bytes:
        """uint8 RGB (H, W, 3) -> the bytes the codec stores, at sweep value `value`. Raises
        whatever the encoder raises (e.g. an image too large for the format)."""

    @abc.abstractmethod
    def decode(self, data: bytes, height: int, width: int, threads: int = 1) -> np.ndarray:
        """Bytes from `encode` -> uint8 RGB (height, width, 3). Raises ValueError if the decoder
        gives another size."""

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """What the codec is, for the report and the evaluation units' hash: name, label, format,
        param, sweep, settings (fixed encoder settings), package, library (with versions)."""

    def prepare(self, value: float) -> None:
        """Load what coding at `value` needs (a model), so that no timed call pays for it."""

    def point_label(self, value: float) -> str:
        return f"bpp={value:g}" if self.param == "target_bpp" else f"q={value:g}"


def _check_size(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    if rgb.shape != (height, width, 3):
        raise ValueError(f"decoded image is {rgb.shape[1]}x{rgb.shape[0]}, the original {width}x{height}")
    return rgb


# ====================================================================== Pillow

_PIL_FEATURES = {"JPEG": "jpg", "WEBP": "webp", "AVIF": "avif", "JPEG2000": "jpg_2000"}


@dataclass(frozen=True)
class PillowBaseline(Baseline):
    name: str
    label: str
    pil_format: str  # Pillow's format name for save()
    param: str
    sweep: tuple[float, ...]
    save_args: Mapping[str, Any] = field(default_factory=dict)  # fixed encoder settings
    package: str | None = None  # the pip package that provides the format, if not Pillow itself
    module: str | None = None  # imported to register the format with Pillow
    cost: float = 0.01
    kind: str = "classic"

    def with_settings(self, **settings: Any) -> PillowBaseline:
        """The same codec with some fixed settings changed (the benchmarks' chosen points)."""
        return dataclasses.replace(self, save_args={**self.save_args, **settings})

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

    def ensure_available(self) -> None:
        from PIL import Image, features

        if self.module:
            try:
                __import__(self.module)
            except ImportError as exc:
                raise CodecUnavailableError(f"codec {self.name} needs the package {self.package} "
                                            f"(pip install {self.package}): {exc}") from None
        feature = _PIL_FEATURES.get(self.pil_format)
        if feature and not features.check(feature):
            raise CodecUnavailableError(f"codec {self.name}: this Pillow ({Image.__version__}) was built without "
                                        f"{self.pil_format} support")
        if self.pil_format == "AVIF" and self.save_args.get("codec", "auto") != "auto":
            from PIL import _avif

            if not _avif.encoder_codec_available(self.save_args["codec"]):
                raise CodecUnavailableError(f"codec {self.name}: libavif here has no {self.save_args['codec']} encoder")
        if self.pil_format not in Image.SAVE:
            Image.init()
            if self.pil_format not in Image.SAVE:
                raise CodecUnavailableError(f"codec {self.name}: Pillow cannot save {self.pil_format}")
        self._decoder_thread_setting()  # imports the plugin now, not inside the first timed decode

    def library_version(self) -> str:
        """The library behind the codec, with its version."""
        from PIL import Image, features

        if self.package:
            try:
                from importlib.metadata import version

                return f"{self.package} {version(self.package)}"
            except Exception:
                return f"{self.package} (not installed)"
        feature = _PIL_FEATURES[self.pil_format]
        name = {"jpg": "libjpeg", "webp": "libwebp", "avif": "libavif", "jpg_2000": "OpenJPEG"}[feature]
        version_text = features.version(feature)
        if feature == "jpg" and features.check_feature("libjpeg_turbo"):
            name, version_text = "libjpeg-turbo", features.version_feature("libjpeg_turbo")
        extra = ""
        if self.pil_format == "AVIF":
            try:
                from PIL import _avif

                extra = f" ({_avif.codec_versions()})"
            except Exception:
                pass
        return f"Pillow {Image.__version__}, {name} {version_text}{extra}"

    def describe(self) -> dict[str, Any]:
        # Part of every evaluation unit's hash: a change here makes old parts stale.
        return {"name": self.name, "label": self.label, "format": self.pil_format, "param": self.param,
                "sweep": list(self.sweep), "settings": dict(self.save_args), "package": self.package,
                "library": self.library_version()}

    def _decoder_thread_setting(self) -> tuple[Any, str] | None:
        """(module, attribute) that sets this format's decoder threads (a module setting of its
        Pillow plugin), or None."""
        if self.pil_format == "AVIF":
            from PIL import AvifImagePlugin

            return AvifImagePlugin, "DEFAULT_MAX_THREADS"
        if self.pil_format == "JXL":
            from pillow_jxl import JpegXLImagePlugin

            return JpegXLImagePlugin, "DECODE_THREADS"
        return None

    @contextlib.contextmanager
    def _decoder_threads(self, threads: int) -> Iterator[None]:
        setting = self._decoder_thread_setting()
        if setting is None:
            yield
            return
        module, attribute = setting
        saved = getattr(module, attribute)
        # libjxl: 0 means no parallelism; libavif counts threads.
        setattr(module, attribute, (0 if threads <= 1 else threads) if self.pil_format == "JXL" else threads)
        try:
            yield
        finally:
            setattr(module, attribute, saved)

    def encode(self, rgb: np.ndarray, value: float, threads: int = 1) -> bytes:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(rgb, "RGB").save(buf, format=self.pil_format, **self.save_kwargs(value, threads))
        return buf.getvalue()

    def decode(self, data: bytes, height: int, width: int, threads: int = 1) -> np.ndarray:
        from PIL import Image

        with self._decoder_threads(threads), Image.open(io.BytesIO(data), formats=[self.pil_format]) as image:
            image.load()
            rgb = np.asarray(image.convert("RGB") if image.mode != "RGB" else image)
        return _check_size(rgb, height, width)


# ====================================================================== CompressAI


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    if before != threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if before != threads:
            torch.set_num_threads(before)


_COMPRESSAI: list[tuple[types.ModuleType | None, str]] = []  # the import's outcome, once per process


def import_compressai() -> tuple[types.ModuleType | None, str]:
    """(the compressai module or None, how it was imported / why not). Where the only
    torchvision wheel is a CUDA build whose compiled ops cannot load against a CPU torch,
    `import torchvision` fails in torchvision/_meta_registrations.py ("operator torchvision::nms
    does not exist"); CompressAI imports torchvision only for its transforms registry, which
    its models do not use, so that one module is stubbed out and the import retried."""
    if _COMPRESSAI:
        return _COMPRESSAI[0]
    try:
        import compressai

        outcome: tuple[types.ModuleType | None, str] = (compressai, "plain import")
    except ImportError as exc:
        outcome = (None, f"not importable ({type(exc).__name__}: {exc})")
    except RuntimeError as first:
        # The known cause: torchvision's compiled ops against another torch build. Retry once
        # with that one module stubbed out; if that does not help, report the first error.
        for name in list(sys.modules):  # drop the half-imported modules
            if name.split(".")[0] in ("torchvision", "compressai"):
                del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
        try:
            import compressai

            outcome = (compressai, f"torchvision workaround: `import compressai` failed ({first}), so "
                                   "torchvision._meta_registrations was stubbed out; CompressAI's models do "
                                   "not use it")
        except Exception:
            del sys.modules["torchvision._meta_registrations"]
            outcome = (None, f"not importable ({type(first).__name__}: {first})")
    _COMPRESSAI.append(outcome)
    return outcome


@dataclass(frozen=True)
class CompressAIBaseline(Baseline):
    name: str
    label: str
    architecture: str  # the CompressAI zoo's name: "mbt2018", "bmshj2018-hyperprior"
    sweep: tuple[float, ...] = (1, 2, 3, 4, 5, 6, 7, 8)  # CompressAI's quality ladder
    pretrained: bool = True  # False: random init (speed benchmarks: only the times mean anything)
    metric: str = "mse"  # which pretrained weights: mse or ms-ssim
    cost: float = 1.0
    param: str = "quality"
    kind: str = "learned"
    multiple: int = 64  # both models downsample by 2^6 (the hyperprior's z)
    _models: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # quality -> model

    def random_init(self) -> CompressAIBaseline:
        """The same models with random weights (seeded), which need no download."""
        return dataclasses.replace(self, pretrained=False)

    def _compressai(self) -> types.ModuleType:
        module, how = import_compressai()
        if module is None:
            raise CodecUnavailableError(
                f"codec {self.name} needs CompressAI, which is {how}. It is not a project dependency (its "
                f"install would pull a CUDA torch); install it without its dependencies: {COMPRESSAI_INSTALL}")
        return module

    def weights_files(self) -> dict[int, tuple[str, str]]:
        """quality -> (the file in torch hub's cache that CompressAI's zoo loads, its URL)."""
        import torch
        from urllib.parse import urlparse

        self._compressai()
        from compressai.zoo.image import model_urls

        urls = model_urls.get(self.architecture, {}).get(self.metric, {})
        folder = os.path.join(torch.hub.get_dir(), "checkpoints")
        out = {}
        for quality in self.sweep:
            url = urls.get(int(quality))
            if url is None:
                raise CodecUnavailableError(f"codec {self.name}: CompressAI has no pretrained {self.architecture} "
                                            f"({self.metric}) at quality {quality:g}")
            out[int(quality)] = (os.path.join(folder, os.path.basename(urlparse(url).path)), url)
        return out

    def ensure_available(self) -> None:
        self._compressai()
        if not self.pretrained:
            return
        files = self.weights_files()
        missing = [(path, url) for path, url in files.values() if not os.path.isfile(path)]
        if missing:
            folder = os.path.dirname(missing[0][0])
            sources = sorted({os.path.dirname(url) for _, url in missing})
            raise CodecUnavailableError(
                f"codec {self.name} needs CompressAI's pretrained weights, and this project never downloads at "
                f"run time: put {', '.join(os.path.basename(path) for path, _ in missing)} in {folder} (torch "
                f"hub's cache; TORCH_HOME moves it); CompressAI publishes them at {' and '.join(sources)}/")

    def describe(self) -> dict[str, Any]:
        # Part of every evaluation unit's hash: the weights' file names carry CompressAI's hashes.
        import torch

        module, _ = import_compressai()
        files = []
        if module is not None and self.pretrained:
            with contextlib.suppress(CodecUnavailableError):
                files = [os.path.basename(path) for path, _ in self.weights_files().values()]
        return {"name": self.name, "label": self.label, "format": "CompressAI", "param": self.param,
                "sweep": list(self.sweep),
                "settings": {"architecture": self.architecture, "metric": self.metric,
                             "weights": "pretrained" if self.pretrained else "random init (seed 0)",
                             "padding": f"zeros to a multiple of {self.multiple}, output cropped"},
                "package": "compressai", "weights_files": files,
                "library": (f"CompressAI {module.__version__}, torch {torch.__version__}" if module is not None
                            else "compressai (not installed)")}

    def prepare(self, value: float) -> None:
        self._model(value)

    def _model(self, quality: float):
        model = self._models.get(int(quality))
        if model is not None:
            return model
        import torch

        self.ensure_available()  # never let the zoo reach for the network
        from compressai import zoo

        factory = getattr(zoo, self.architecture.replace("-", "_"))
        if self.pretrained:
            model = factory(quality=int(quality), metric=self.metric, pretrained=True, progress=False).eval()
        else:
            with torch.random.fork_rng(devices=[]):  # the same weights every run, the caller's RNG untouched
                torch.manual_seed(0)
                model = factory(quality=int(quality), metric=self.metric, pretrained=False).eval()
            model.update(force=True)  # the entropy models' CDF tables (pretrained weights carry theirs)
        self._models[int(quality)] = model
        return model

    def encode(self, rgb: np.ndarray, value: float, threads: int = 1) -> bytes:
        import torch

        model = self._model(value)
        h, w = rgb.shape[:2]
        with torch.no_grad(), _torch_threads(threads):
            x = torch.from_numpy(np.array(rgb, dtype=np.uint8))  # (H, W, 3), a writable copy
            x = x.permute(2, 0, 1).unsqueeze(0).float().div_(255)  # (1, 3, H, W) in [0, 1]
            x = torch.nn.functional.pad(x, (0, -w % self.multiple, 0, -h % self.multiple))  # zeros right and below
            out = model.compress(x)
        y_string, z_string = (s[0] for s in out["strings"])  # one string per entropy model, batch of 1
        return struct.pack(FRAME, int(value), len(y_string)) + y_string + z_string

    def decode(self, data: bytes, height: int, width: int, threads: int = 1) -> np.ndarray:
        import torch

        head = struct.calcsize(FRAME)
        if len(data) < head:
            raise ValueError(f"{self.name}: {len(data)} bytes are too few for a stream of this codec")
        quality, y_bytes = struct.unpack_from(FRAME, data)
        if quality not in self.sweep or head + y_bytes > len(data):
            raise ValueError(f"{self.name}: not a stream of this codec (quality {quality}, {y_bytes} bytes of y "
                             f"in {len(data)})")
        model = self._model(quality)
        strings = [[data[head:head + y_bytes]], [data[head + y_bytes:]]]
        shape = (-(-height // self.multiple), -(-width // self.multiple))  # z's size: the padded image / 64
        with torch.no_grad(), _torch_threads(threads):
            x_hat = model.decompress(strings, shape)["x_hat"]  # (1, 3, H', W') in [0, 1]
            x_hat = x_hat[0, :, :height, :width].clamp_(0, 1).mul_(255).round_().to(torch.uint8)
        return _check_size(x_hat.permute(1, 2, 0).contiguous().numpy(), height, width)


# ====================================================================== the table


# The one table of baselines and their sweeps.
BASELINES: dict[str, Baseline] = {b.name: b for b in (
    PillowBaseline("jpeg-420", "JPEG 4:2:0", "JPEG", "quality", (5, 10, 15, 20, 30, 40, 50, 60, 70, 80),
                   {"subsampling": "4:2:0"}, cost=0.02),
    PillowBaseline("jpeg-444", "JPEG 4:4:4", "JPEG", "quality", (5, 10, 15, 20, 30, 40, 50, 60, 70),
                   {"subsampling": "4:4:4"}, cost=0.02),
    PillowBaseline("webp", "WebP", "WEBP", "quality", (0, 2, 5, 10, 20, 30, 40, 50, 65, 80),
                   {"method": 6}, cost=0.1),
    PillowBaseline("avif", "AVIF", "AVIF", "quality", (5, 10, 15, 20, 30, 40, 50, 60, 70),
                   {"subsampling": "4:4:4", "speed": 6, "range": "full", "codec": "aom"}, cost=0.4),
    PillowBaseline("jpeg2000", "JPEG 2000", "JPEG2000", "target_bpp",
                   (0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5),
                   {"quality_mode": "rates", "irreversible": True, "mct": 1, "no_jp2": True}, cost=0.1),
    PillowBaseline("jxl", "JPEG XL", "JXL", "quality", (5, 20, 30, 40, 50, 60, 70, 80, 85),
                   {"effort": 7}, package="pillow-jxl-plugin", module="pillow_jxl", cost=0.25),
    # Costs from bench/peer_speed.py at 768x512 on one thread (encode + decode).
    CompressAIBaseline("compressai-bmshj2018-hyperprior", "CompressAI bmshj2018-hyperprior", "bmshj2018-hyperprior",
                       cost=1.6),
    CompressAIBaseline("compressai-mbt2018", "CompressAI mbt2018", "mbt2018", cost=20.0),
)}


def get_baseline(name: str) -> Baseline:
    """The baseline of that exact name; ValueError naming the known ones otherwise."""
    try:
        return BASELINES[name]
    except KeyError:
        raise ValueError(f"unknown baseline codec {name!r} (known: {known_names()})") from None


def known_names() -> str:
    return ", ".join(list(BASELINES) + [a for a in BASELINE_ALIASES if a not in BASELINES] + ["all", "none"])


def expand_baselines(names) -> list[str]:
    """Codec names from what a user wrote: "all" (the Pillow codecs), "none", aliases ("jpeg" =
    both JPEGs, "compressai" = both CompressAI models), a comma-separated string or a list.
    Unknown names raise ValueError naming the known ones."""
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
            if target not in BASELINES:
                raise ValueError(f"unknown baseline codec {name!r} (known: {known_names()})")
            if target not in out:
                out.append(target)
    return out
