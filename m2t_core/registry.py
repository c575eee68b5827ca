"""Checkpoints and the model registry.

A checkpoint is ONE safetensors file: the tensors, plus string metadata holding the
constructor arguments (`config`, JSON), the registry name (`model_id`) and free-form
information about training and measured figures (`info`, JSON). Loading never unpickles.

Registry names resolve to `<name>.safetensors` in the directories of the environment
variable M2T_MODEL_PATH (os.pathsep-separated), then in the package's `weights/` folder.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .codec import M2TCodec
from .config import ConfigError, ModelConfig

CHECKPOINT_FORMAT = "m2t-checkpoint"
CHECKPOINT_VERSION = "1"
PACKAGE_WEIGHTS = Path(__file__).resolve().parent / "weights"
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEFAULT_MODEL = "m2t-small-q3"


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
                    info: dict[str, Any] | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Write model weights (cast to `dtype`) and its config to one safetensors file."""
    model_id = model_id or model.model_id
    if not MODEL_NAME_RE.match(model_id):
        raise ValueError(f"invalid model name {model_id!r}: letters, digits, '.', '_', '-' (max 64)")
    tensors = {
        k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
        for k, v in model.state_dict().items()
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


def read_metadata(path: str | Path) -> tuple[str, ModelConfig, dict[str, Any]]:
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not an m2t checkpoint (metadata format={meta.get('format')!r})")
    if meta.get("format_version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint version {meta.get('format_version')!r}")
    try:
        config = ModelConfig.from_dict(json.loads(meta["config"]))
        info = json.loads(meta.get("info", "{}"))
    except (KeyError, json.JSONDecodeError, ConfigError) as exc:
        raise CheckpointError(f"{path}: bad config in metadata: {exc}") from None
    return meta.get("model_id", path.stem), config, info


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> M2TCodec:
    path = Path(path)
    model_id, config, _ = read_metadata(path)
    model = M2TCodec(config, model_id=model_id)
    expected = model.state_dict()
    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        missing, unexpected = sorted(set(expected) - keys), sorted(keys - set(expected))
        if missing or unexpected:
            raise CheckpointError(f"{path}: tensors do not match the config (missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]})")
        for k in keys:
            t = f.get_tensor(k)
            if tuple(t.shape) != tuple(expected[k].shape):
                raise CheckpointError(f"{path}: tensor {k} has shape {tuple(t.shape)}, "
                                      f"config expects {tuple(expected[k].shape)}")
            tensors[k] = t.to(expected[k].dtype)
    model.load_state_dict(tensors)
    return model.to(device).eval()


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


_CACHE: dict[tuple[str, str], M2TCodec] = {}


def load_model(name_or_path: str | Path | None = None, device: str | torch.device = "cpu",
               cache: bool = True) -> M2TCodec:
    """Load a model by registry name or checkpoint path (cached per process by default)."""
    name_or_path = str(name_or_path or DEFAULT_MODEL)
    looks_like_path = name_or_path.endswith(".safetensors") or os.sep in name_or_path
    path = Path(name_or_path) if looks_like_path else find_model(name_or_path)
    if not path.is_file():
        raise ModelNotFoundError(f"checkpoint not found: {path}")
    key = (str(path.resolve()), str(device))
    if cache and key in _CACHE:
        return _CACHE[key]
    model = load_checkpoint(path, device)
    if cache:
        _CACHE[key] = model
    return model


def update_checkpoint_info(path: str | Path, updates: dict[str, Any]) -> None:
    """Merge `updates` into a checkpoint's `info` metadata; tensors are rewritten unchanged."""
    from safetensors.torch import load_file

    path = Path(path)
    model_id, config, info = read_metadata(path)
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    tensors = load_file(str(path))
    info.update(updates)
    metadata["info"] = json.dumps(info, sort_keys=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
