"""Checkpoints and the model registry.

A checkpoint is ONE safetensors file: the tensors, plus string metadata holding the
constructor arguments (`config`, JSON), the registry name (`model_id`) and free-form
information about training and measured figures (`info`, JSON). Loading never unpickles.

Tensors: the transforms (`g_a.*`, `g_s.*`, float), the exact entropy model (`exact.*`,
integers, each stored in the narrowest integer type that holds its values) and, in training
checkpoints only, the float entropy parameters (`entropy_model.*`); without them they are
rebuilt from the exact model. Checkpoints of version 2 (m2t 0.2) are read too: their float
entropy weights were laid out differently and are rebuilt from the exact model, and the
format-1 weights they carry (`legacy_entropy_model.*`) are ignored. Version 1 checkpoints
have no exact model: m2t 0.2.0 converts them (`python -m pipeline.convert_exact`).

Registry names resolve to `<name>.safetensors` in the directories of the environment
variable M2T_MODEL_PATH (os.pathsep-separated), then in the package's `weights/` folder.
A stream names its model and weights hash: to decode it, the registry also tries the
weights a model name had before, kept as `previous/<name>@<digest>.safetensors` in the same
folders (pipeline.training.select_model --ship keeps the file it replaces there), so
archives written before a retrained model was installed still decode. `m2t models` and
find_model see only the current files. Kept weights are decode-only (write_decode_only,
checkpoint version 6): every tensor but g_a's, which decoding never uses, with the weights
digests that need g_a stored beside a SHA-256 of the tensors kept (checked at every load);
such a model decodes and refuses to encode.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import ConfigError, ModelConfig

if TYPE_CHECKING:  # torch and the model are imported where a model is built: listing and
    import torch  # reading checkpoints' metadata (m2t models, m2t info) stay fast

    from .model import M2TCodec

MAX_SAFETENSORS_HEADER = 16 << 20  # bytes of a checkpoint's JSON header (its tensor table and metadata)

CHECKPOINT_FORMAT = "m2t-checkpoint"
# 4: the integer synthesis transform (g_s_int.*); 5: its convolution weights left out where
# g_s_int.weights_from reproduces them from the float g_s (22 % smaller files). 2-4 are still read.
CHECKPOINT_VERSION = "5"
# 6: a decode-only checkpoint (write_decode_only): a version-5 file's tensors but g_a's, and the
# weights digests g_a is needed for. Written for replaced weights (previous/) only.
DECODE_ONLY_VERSION = "6"
READABLE_CHECKPOINT_VERSIONS = ("1", "2", "3", "4", "5", DECODE_ONLY_VERSION)
ANALYSIS_PREFIX = "g_a."  # what a decode-only checkpoint leaves out
IGNORED_V2_PREFIXES = ("entropy_model.", "legacy_entropy_model.")  # rebuilt from exact.* / format 1 only
PACKAGE_WEIGHTS = Path(__file__).resolve().parent / "weights"
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEFAULT_MODEL = "m2t-small-q3"
PREVIOUS_DIR = "previous"  # replaced weights of a name, kept so that their streams still decode


class ModelNotFoundError(LookupError):
    pass


class CheckpointError(ValueError):
    """A checkpoint file is malformed or does not match its config."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: Path
    config: ModelConfig
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size


def search_dirs() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("M2T_MODEL_PATH", "").split(os.pathsep) if p]
    return extra + [PACKAGE_WEIGHTS]


def save_checkpoint(model: M2TCodec, path: str | Path, model_id: str | None = None,
                    info: dict[str, Any] | None = None, dtype: torch.dtype | None = None,
                    float_entropy_model: bool = True) -> Path:
    """Write model weights (float tensors cast to `dtype`; integer tensors in the narrowest
    integer type that holds them) and its config to one safetensors file. With
    `float_entropy_model=False` (shipped models), the float entropy weights are left out:
    loading rebuilds them from the exact model. The integer g_s's convolution weights are left
    out when the float g_s, as written, gives them back exactly (IntSynthesis.weights_from)."""
    import torch
    from safetensors.torch import save_file

    dtype = torch.float32 if dtype is None else dtype
    model_id = model_id or model.model_id
    model.require_analysis()  # a decode-only model's g_a is not its own: never written as if it were
    if not MODEL_NAME_RE.match(model_id):
        raise ValueError(f"invalid model name {model_id!r}: letters, digits, '.', '_', '-' (max 64)")
    model.sync_exact()
    derived = _derivable_synthesis_weights(model, dtype)
    tensors = {
        k: (v.detach().to("cpu", dtype) if v.is_floating_point() else _narrowest(v.detach().cpu())).contiguous()
        for k, v in model.state_dict().items()
        if (float_entropy_model or not k.startswith("entropy_model.")) and k not in derived
    }
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "model_id": model_id,
        "config": json.dumps(model.cfg.to_dict(), sort_keys=True),
        "info": json.dumps(info or {}, sort_keys=True),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def write_decode_only(source: str | Path, target: str | Path) -> Path:
    """Write the checkpoint `source` (version 5) as a decode-only one at `target`: its tensors
    byte for byte but g_a's (which decoding never uses: ~23 % of a shipped file), plus the
    weights digests of every readable format, computed here from the whole model, and a
    SHA-256 of the tensors kept, checked at every load. For replaced weights (previous/): their
    streams decode as before; they cannot encode. The file is checked before it is installed:
    it loads to the same decoding state and digests as `source`."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from . import bitstream

    source, target = Path(source), Path(target)
    meta = _checked_metadata(source)
    if meta.get("format_version") == DECODE_ONLY_VERSION:
        raise CheckpointError(f"{source}: already decode-only")
    if meta.get("format_version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{source}: checkpoint version {meta.get('format_version')!r}; save it again with this "
                              f"m2t (version {CHECKPOINT_VERSION}) before making it decode-only")
    whole = load_checkpoint(source)
    digests = {str(v): whole.weights_digest(v).hex() for v in bitstream.READABLE_VERSIONS}
    with safe_open(str(source), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(ANALYSIS_PREFIX)}
    meta["format_version"] = DECODE_ONLY_VERSION
    meta["decode_only"] = json.dumps({"weights_digests": digests, "tensors_sha256": _tensors_sha256(tensors)},
                                     sort_keys=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    try:
        check = load_checkpoint(tmp)
        part, want = check.state_dict(), whole.state_dict()
        same = part.keys() == want.keys() and all(
            torch.equal(part[k], t) for k, t in want.items() if not k.startswith(ANALYSIS_PREFIX))
        if not same or any(check.weights_digest(v) != whole.weights_digest(v) for v in bitstream.READABLE_VERSIONS):
            raise CheckpointError(f"{source}: the decode-only file does not load to the same model (not written)")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.chmod(tmp, 0o644)
    os.replace(tmp, target)
    return target


def _tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors as stored: names, dtypes, shapes and bytes, in name order."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _decode_only_digests(path: Path, meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> dict[int, bytes]:
    """A decode-only checkpoint's stored weights digests, once its tensors are the ones they
    were computed with (CheckpointError otherwise)."""
    try:
        record = json.loads(meta["decode_only"])
        digests = {int(v): bytes.fromhex(h) for v, h in record["weights_digests"].items()}
        want = record["tensors_sha256"]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path}: a decode-only checkpoint without a readable record of its digests ({exc})") \
            from None
    if _tensors_sha256(tensors) != want:
        raise CheckpointError(f"{path}: its tensors are not the ones its weights digests were computed with "
                              "(a damaged or edited decode-only checkpoint)")
    if any(len(d) != 32 for d in digests.values()):
        raise CheckpointError(f"{path}: malformed weights digests")
    return digests


def _synthesis_weight_keys(model: M2TCodec) -> set[str]:
    return {f"g_s_int.convs.{key}.weight" for key in model.g_s_int.convs}


def _derivable_synthesis_weights(model: M2TCodec, dtype: torch.dtype) -> set[str]:
    """The integer g_s's weight keys when the float g_s rounded to `dtype` reproduces them all
    (then a checkpoint need not store them), else none."""
    import copy

    import torch

    g_s = copy.deepcopy(model.g_s).cpu()
    with torch.no_grad():
        for param in g_s.parameters():
            param.copy_(param.to(dtype).to(param.dtype))
    return _synthesis_weight_keys(model) if model.g_s_int.derivable_weights(g_s) else set()


def read_metadata(path: str | Path) -> tuple[str, ModelConfig, dict[str, Any]]:
    path = Path(path)
    meta = _checked_metadata(path)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not an m2t checkpoint (metadata format={meta.get('format')!r})")
    if meta.get("format_version") not in READABLE_CHECKPOINT_VERSIONS:
        raise CheckpointError(f"{path}: unsupported checkpoint version {meta.get('format_version')!r}")
    try:
        config = ModelConfig.from_dict(json.loads(meta["config"]))
        info = json.loads(meta.get("info", "{}"))
    except (KeyError, json.JSONDecodeError, ConfigError) as exc:
        raise CheckpointError(f"{path}: bad config in metadata: {exc}") from None
    return meta.get("model_id", path.stem), config, info


def read_checkpoint_version(path: str | Path) -> str | None:
    """A checkpoint's format_version (metadata only, no torch); None where it has none."""
    return _checked_metadata(Path(path)).get("format_version")


def _checked_metadata(path: Path) -> dict[str, str]:
    """_safetensors_metadata, any failure a CheckpointError naming the file."""
    try:
        return _safetensors_metadata(path)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def _safetensors_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a safetensors file, read from its JSON header without torch
    (the format: an 8-byte little-endian header size, then the header)."""
    with open(path, "rb") as f:
        size_bytes = f.read(8)
        if len(size_bytes) != 8:
            raise ValueError("shorter than a safetensors header")
        (size,) = struct.unpack("<Q", size_bytes)
        if size > MAX_SAFETENSORS_HEADER:
            raise ValueError(f"header of {size} bytes (at most {MAX_SAFETENSORS_HEADER})")
        header = json.loads(f.read(size))
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError("malformed metadata")
    return meta


def _narrowest(t: torch.Tensor) -> torch.Tensor:
    """An integer tensor in the narrowest signed type that holds its values (loading casts
    it back to the model's type: the values, and the weights hash, are unchanged)."""
    import torch

    lo, hi = (int(t.min()), int(t.max())) if t.numel() else (0, 0)
    for dtype in (torch.int8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return t.to(dtype)
    return t.to(torch.int64)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> M2TCodec:
    from safetensors import safe_open

    from .model import M2TCodec

    path = Path(path)
    model_id, config, info = read_metadata(path)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata() or {}
        version = meta.get("format_version")
    decode_only = version == DECODE_ONLY_VERSION  # no g_a: its weights digests are stored
    if not any(k.startswith("exact.") for k in keys):
        raise CheckpointError(
            f"{path}: a checkpoint of m2t before 0.2 (float entropy model only): it cannot code portable streams; "
            "convert it with m2t 0.2.0 (python -m pipeline.convert_exact), then load the result")
    if version == "2":  # m2t 0.2: float entropy weights in the old layout, format-1 weights
        keys = {k for k in keys if not k.startswith(IGNORED_V2_PREFIXES)}
    model = M2TCodec(config, model_id=model_id, export=False)  # the file holds or derives every integer
    has_float = any(k.startswith("entropy_model.") for k in keys)
    has_int_synthesis = any(k.startswith("g_s_int.") for k in keys)  # versions 2-3 have none
    synthesis_weights = _synthesis_weight_keys(model)
    derive_synthesis = has_int_synthesis and not (synthesis_weights & keys)  # version 5
    derived = synthesis_weights if derive_synthesis else set()
    expected = {k: v for k, v in model.state_dict().items()
                if (has_float or not k.startswith("entropy_model.")) and (has_int_synthesis or not k.startswith("g_s_int."))
                and k not in derived and not (decode_only and k.startswith(ANALYSIS_PREFIX))}
    tensors, stored = {}, {}
    with safe_open(str(path), framework="pt") as f:
        missing, unexpected = sorted(set(expected) - keys), sorted(keys - set(expected))
        if missing or unexpected:
            raise CheckpointError(f"{path}: tensors do not match the config (missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]})")
        for k in keys:
            t = f.get_tensor(k)
            if tuple(t.shape) != tuple(expected[k].shape):
                raise CheckpointError(f"{path}: tensor {k} has shape {tuple(t.shape)}, "
                                      f"config expects {tuple(expected[k].shape)}")
            stored[k], tensors[k] = t, t.to(expected[k].dtype)
    digests = _decode_only_digests(path, meta, stored) if decode_only else None
    model.load_state_dict(tensors, strict=has_float and has_int_synthesis and not derive_synthesis and not decode_only)
    if not has_float:
        model.exact.load_into(model.entropy_model)
    if derive_synthesis:
        model.g_s_int.weights_from(model.g_s)
    if not has_int_synthesis:
        _calibrate_synthesis_without_data(model)
    model.mark_exact_synced()
    if digests is not None:
        model.set_decode_only(digests)
    model.rd_lambda = trained_lambda(info)
    return model.to(device).eval()


def trained_lambda(info: dict[str, Any]) -> float | None:
    """The rate-distortion lambda a checkpoint's `info` says it was trained for (bits + lambda x
    MSE on the 0..255 scale), or None where it names no usable one (a finite number > 0)."""
    value = info.get("lambda")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return None
    return float(value)


def _calibrate_synthesis_without_data(model: M2TCodec) -> None:
    """A checkpoint of m2t 0.3 or earlier has no integer g_s: its exponents are calibrated here
    on a fixed synthetic latent (seeded Laplace integers), which serves for decoding; the
    trainer calibrates on real latents. Save the model again (save_checkpoint) to keep the
    result: the weights hash of formats 4 and 5 names the integer g_s, so a stream written with this
    model decodes only with the same exponents (any mismatch is refused, never mis-decoded)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    C = model.cfg.C
    u = torch.rand(2, C, 16, 16, generator=generator, dtype=torch.float64) - 0.5
    y = torch.round(-4.0 * torch.sign(u) * torch.log1p(-2.0 * u.abs())).float()  # Laplace(0, 4), integers
    model.calibrate_synthesis([y])


def find_model(name: str) -> Path:
    if not MODEL_NAME_RE.match(name):
        raise ModelNotFoundError(f"unknown model {name!r}")
    for d in search_dirs():
        candidate = d / f"{name}.safetensors"
        if candidate.is_file():
            return candidate
    known = ", ".join(m.name for m in list_models()) or "none installed"
    raise ModelNotFoundError(f"unknown model {name!r} (available: {known})")


def list_models() -> list[ModelInfo]:
    seen, out = set(), []
    for d in search_dirs():
        if not d.is_dir():
            continue
        for path in sorted(d.glob("*.safetensors")):
            if path.stem in seen:
                continue
            try:
                model_id, config, info = read_metadata(path)
            except CheckpointError:
                continue
            seen.add(path.stem)
            out.append(ModelInfo(path.stem, path, config, info))
    return out


def list_previous_models() -> list[ModelInfo]:
    """The replaced weights kept for their streams (`previous/<name>@<hash>.safetensors` in
    each model folder), named `<name>@<hash>`; metadata only, no torch."""
    out = []
    for d in search_dirs():
        for path in sorted((d / PREVIOUS_DIR).glob("*@*.safetensors")) if (d / PREVIOUS_DIR).is_dir() else ():
            try:
                _, config, info = read_metadata(path)
            except CheckpointError:
                continue
            out.append(ModelInfo(path.stem, path, config, info))
    return out


_CACHE: dict[tuple[str, int, int, str], M2TCodec] = {}


def checkpoint_path(name_or_path: str | Path | None = None) -> Path:
    """The checkpoint file a registry name or a path names (the default model without one)."""
    name_or_path = str(name_or_path or DEFAULT_MODEL)
    looks_like_path = name_or_path.endswith(".safetensors") or os.sep in name_or_path
    return Path(name_or_path) if looks_like_path else find_model(name_or_path)


def load_model(name_or_path: str | Path | None = None, device: str | torch.device = "cpu",
               cache: bool = True) -> M2TCodec:
    """Load a model by registry name or checkpoint path (cached per process by default)."""
    path = checkpoint_path(name_or_path)
    if not path.is_file():
        raise ModelNotFoundError(f"checkpoint not found: {path}")
    stat = path.stat()  # a file replaced in place (a shipped retrained model) is loaded anew
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, str(device))
    if cache and key in _CACHE:
        return _CACHE[key]
    model = load_checkpoint(path, device)
    if cache:
        _CACHE[key] = model
    return model


def update_checkpoint_info(path: str | Path, updates: dict[str, Any]) -> bool:
    """Merge `updates` into a checkpoint's `info` metadata; tensors are rewritten unchanged.
    Returns False, leaving the file alone, where `info` holds these values already (a shipped
    file rewritten for nothing would be 8 MB more in the repository's history)."""
    from safetensors.torch import load_file, save_file

    path = Path(path)
    model_id, config, info = read_metadata(path)
    if all(k in info and info[k] == v for k, v in updates.items()):
        return False
    metadata = _safetensors_metadata(path)
    tensors = load_file(str(path))
    info.update(updates)
    metadata["info"] = json.dumps(info, sort_keys=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return True


# ---------------------------------------------------------------- models named by bitstreams

from .bitstream import ModelMismatchError  # noqa: E402


class UnknownStreamModelError(ModelNotFoundError, ModelMismatchError):
    """A bitstream names a model that is not installed (matched by name AND weights hash).
    Both a ModelNotFoundError and a BitstreamError (ModelMismatchError)."""


def installed_checkpoints(name: str) -> list[Path]:
    """Every installed checkpoint file called `<name>.safetensors` ($M2T_MODEL_PATH, then the
    package's weights/), then the name's previous weights (`previous/<name>@*.safetensors`
    in the same folders), for a valid registry name; [] otherwise. Never a path from `name`
    (a valid name holds no glob character)."""
    if not isinstance(name, str) or not MODEL_NAME_RE.match(name):
        return []
    out = []
    for d in search_dirs():
        candidate = d / f"{name}.safetensors"
        if candidate.is_file():
            out.append(candidate)
    for d in search_dirs():  # the weights the name had before, after every current file
        out.extend(sorted(p for p in (d / PREVIOUS_DIR).glob(f"{name}@*.safetensors") if p.is_file()))
    return out


def load_model_for_header(header, device: str | torch.device = "cpu") -> M2TCodec:
    """The installed model that wrote a bitstream: the header's model id is only ever matched
    against registry names (never used as a path), and the checkpoint's weights hash must be
    the header's. Raises UnknownStreamModelError (a BitstreamError) when none is installed."""
    name = header.model_id
    if not isinstance(name, str) or not MODEL_NAME_RE.match(name):
        raise UnknownStreamModelError(
            f"the bitstream names model {name!r}, which is not a valid model name: a stream can only "
            "select an installed model by name (pass a checkpoint explicitly to decode with another)")
    tried = []
    for path in installed_checkpoints(name):
        try:
            model = load_model(path, device=device)
        except (CheckpointError, ConfigError, OSError, ValueError) as exc:
            tried.append(f"{path} (unreadable: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
            continue
        if model.wrote(header):
            return model
        known = model.known_weights_hash(header.version)
        tried.append(f"{path} (weights {known.hex() if known else 'of an older format only'})")
    raise UnknownStreamModelError(
        f"the bitstream needs model {name!r} with weights hash {header.weights_hash.hex()}, which is not "
        f"installed ({'; '.join(tried) if tried else 'no checkpoint of that name'}): put it in $M2T_MODEL_PATH "
        "or pass it explicitly (--model PATH)")


def find_installed_model(name: str, weights_hash_hex: str, device: str | torch.device = "cpu") -> Path | None:
    """The installed checkpoint called `name` whose model.weights_hash() is `weights_hash_hex`
    (e.g. an archive manifest's model), or None."""
    for path in installed_checkpoints(name):
        try:
            model = load_model(path, device=device)
        except (CheckpointError, ConfigError, OSError, ValueError):
            continue
        names = {h.hex() for h in model.weights_hashes().values()}  # an archive of m2t 0.3 names v3's
        if model.model_id == name and weights_hash_hex in names:
            return path
    return None
