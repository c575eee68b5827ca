"""Model configuration: one small dataclass holding every constructor argument.

A checkpoint stores this config next to its weights, so a model can always be rebuilt
from the file alone. Unknown keys are an error, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

MODES = ("m2t", "mt")
GROUP_SIZE_SCHEDULES = ("powerlaw", "cosine")
LOCATION_ORDERS = ("qlds", "raster", "random")


class ConfigError(ValueError):
    """A configuration file or mapping is malformed (unknown key, wrong type, bad value)."""


@dataclass(frozen=True)
class ModelConfig:
    """Defaults are the `m2t-small` preset (configs/models/m2t-small.yaml)."""

    # mode: "m2t" masks inputs and attention (cached incremental decoding),
    #       "mt" masks inputs only (MaskGIT-like, S full passes).
    mode: str = "m2t"
    # Analysis/synthesis transforms (ELIC-style, 16x down-sampling).
    N: int = 64  # channels of the transforms
    C: int = 128  # latent channels (token width)
    blocks_per_stage: int = 3  # residual blocks after each stride-2 conv
    attention_blocks: bool = True  # Cheng-2020 simplified attention after stages 2 and 4
    # Transformer entropy model.
    window: int = 16  # tokens per window side; the transformer sees window**2 tokens
    d_model: int = 192
    n_layers: int = 4
    n_heads: int = 4
    d_mlp: int = 768
    n_mixtures: int = 3  # Gaussians per channel
    # Schedule: how the window's tokens are split into coding steps.
    num_steps: int = 12  # S
    alpha: float = 2.2  # power-law exponent of the group sizes
    group_sizes: str = "powerlaw"
    location_order: str = "qlds"
    order_seed: int = 0  # only for location_order == "random"
    # Variable rate (rate.py): the lambdas of the K trained rate levels, low to high; the model
    # then codes at any quality Q in [1, K]. Empty: a fixed-rate model.
    rate_lambdas: tuple = ()

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.group_sizes not in GROUP_SIZE_SCHEDULES:
            raise ConfigError(f"group_sizes must be one of {GROUP_SIZE_SCHEDULES}, got {self.group_sizes!r}")
        if self.location_order not in LOCATION_ORDERS:
            raise ConfigError(f"location_order must be one of {LOCATION_ORDERS}, got {self.location_order!r}")
        for name in ("N", "C", "window", "d_model", "n_layers", "n_heads", "d_mlp", "n_mixtures", "num_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.N % 2:
            raise ConfigError(f"N must be even (residual blocks use N/2 channels), got {self.N}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.num_steps > self.window**2:
            raise ConfigError(f"num_steps ({self.num_steps}) exceeds the tokens per window ({self.window**2})")
        if not self.alpha > 0:
            raise ConfigError(f"alpha must be positive, got {self.alpha}")
        lambdas = self.rate_lambdas
        if not isinstance(lambdas, tuple) or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                                 for v in lambdas):
            raise ConfigError(f"rate_lambdas must be a list of numbers, got {lambdas!r}")
        if lambdas and (len(lambdas) < 2 or len(lambdas) > 64 or not 0 < lambdas[0]
                        or any(b <= a for a, b in zip(lambdas, lambdas[1:]))):
            raise ConfigError(f"rate_lambdas must be 2..64 increasing positive numbers, got {list(lambdas)}")

    @property
    def tokens_per_window(self) -> int:
        return self.window * self.window

    def to_dict(self) -> dict[str, Any]:
        """The constructor arguments (a fixed-rate model's dict is what it was before
        variable rate existed, so its weights digest is unchanged)."""
        data = dataclasses.asdict(self)
        if not self.rate_lambdas:
            del data["rate_lambdas"]
        else:
            data["rate_lambdas"] = [float(v) for v in self.rate_lambdas]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        return dataclass_from_dict(cls, data)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def dataclass_from_dict(cls: type, data: Mapping[str, Any], where: str = ""):
    """Build dataclass `cls` from a mapping; unknown keys and wrong scalar types raise ConfigError.

    Nested dataclass fields are built recursively. Ints are accepted for float fields.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where or cls.__name__}: unknown key(s) {unknown}; known keys: {sorted(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        ftype = fields[name].type
        default = fields[name].default
        sub_where = f"{where}.{name}" if where else name
        sub_cls = _resolve_dataclass(cls, name)
        if sub_cls is not None:
            kwargs[name] = dataclass_from_dict(sub_cls, value, sub_where)
            continue
        kwargs[name] = _coerce_scalar(value, default, ftype, sub_where)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # missing required fields
        raise ConfigError(f"{where or cls.__name__}: {exc}") from None


def _resolve_dataclass(cls: type, name: str):
    import typing

    hints = typing.get_type_hints(cls)
    hint = hints.get(name)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return hint
    return None


def _coerce_scalar(value: Any, default: Any, ftype: Any, where: str) -> Any:
    if default is dataclasses.MISSING or default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(value)
    return value


def load_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON file into a dict (YAML safe_load: no code execution)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load_model_config(path: str | Path) -> ModelConfig:
    data = load_mapping(path)
    # A model preset file may hold the model config at the top level or under "model".
    if set(data) <= {"model", "name", "description"} and "model" in data:
        data = data["model"]
    return ModelConfig.from_dict(data)


_SCIENTIFIC = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def yaml_numbers(value: Any) -> Any:
    """YAML 1.1 reads `1e-4` and `1e6` as strings; turn such strings back into numbers
    (an int where the value is integral and written without a point or negative exponent)."""
    if isinstance(value, str) and _SCIENTIFIC.match(value):
        exponent = value.lower().split("e")[-1]
        return float(value) if "." in value or exponent.startswith("-") else int(float(value))
    if isinstance(value, dict):
        return {k: yaml_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [yaml_numbers(v) for v in value]
    return value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `key=value` overrides in place (dotted keys for nested fields, values as YAML)."""
    import yaml

    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        node = data
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part} is not a mapping")
        node[leaf] = yaml_numbers(yaml.safe_load(raw))
    return data


def load_config_file(cls: type, path: str | Path | None, overrides: Sequence[str] = (),
                     retired: Mapping[str, str] | None = None):
    """A job's config: the YAML file at `path` (optional; unknown keys are errors), then the
    `key=value` overrides (dotted keys for nested fields, values parsed as YAML), as `cls`.
    `retired`: top-level keys the config once had (name -> why it is gone), dropped with a
    logged warning so that old config files still load."""
    data: dict[str, Any] = {}
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"config file not found: {path}")
        data = yaml_numbers(load_mapping(path))
    apply_overrides(data, overrides)
    for key in sorted(set(data) & set(retired or {})):
        logging.getLogger(__name__).warning("config key %r is ignored: %s", key, retired[key])
        del data[key]
    return dataclass_from_dict(cls, data)
