"""The jobs' configs: a YAML file and `--set key=value` overrides into a typed dataclass
(unknown keys are errors), with retired keys accepted and ignored, and the small helpers the
jobs' configs share (absolute URLs, credentials kept out of reports)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

from m2t_core.config import ConfigError, load_config_file

# Keys the jobs once had and no longer use: an old config file (or --set) that names one still
# loads, with a warning, instead of failing as an unknown key would. name -> why it is gone.
RETIRED_KEYS = {
    "window_batch": "windows per transformer call of bitstream format 1; the format written now "
                    "(3) does not use it",
}
SECRET_RE = re.compile(r"(secret|token|password|passwd|credential|key)", re.IGNORECASE)


def load_job_config(cls: type, path: str | Path | None = None, overrides: Sequence[str] = ()):
    """The YAML file at `path` (optional), then the `key=value` overrides, as `cls`
    (m2t_core.config.load_config_file): unknown keys are errors; RETIRED_KEYS are dropped with
    a warning."""
    return load_config_file(cls, path, overrides, retired=RETIRED_KEYS)


def need(ok: bool, message: str) -> None:
    """A config check: ConfigError (exit 2) with `message` unless `ok`."""
    if not ok:
        raise ConfigError(message)


def check_shared_settings(cfg: Any) -> None:
    """The checks the job configs (compress, eval) share: Parquet columns, storage options and
    the Ray settings both have."""
    for name in ("parquet_image_column", "parquet_key_column"):
        need(getattr(cfg, name) is None or isinstance(getattr(cfg, name), str), f"{name} must be a column name")
    need(isinstance(cfg.storage_options, dict) and all(isinstance(v, dict) for v in cfg.storage_options.values()),
         "storage_options must map a protocol to a mapping of options, e.g. {s3: {endpoint_url: ...}}")
    r = cfg.ray
    need(r.address is None or isinstance(r.address, str), "ray.address must be a string or null")
    need(r.use_gpu in (None, True, False), "ray.use_gpu must be null, true or false")
    need(r.placement_timeout_s > 0, "ray.placement_timeout_s must be > 0")


def without_retired(settings: Any) -> Any:
    """A mapping of recorded settings without the retired keys (archives written before a key
    was retired still carry it), for comparing settings across versions."""
    if not isinstance(settings, dict):
        return settings
    return {k: v for k, v in settings.items() if k not in RETIRED_KEYS}


def inputs_and_output(inputs: str | Sequence[str], output: str, what: str = "input") -> tuple[list[str], str]:
    """A job's input URLs and output URL with local paths made absolute; ConfigError if the
    output lies inside an input (its own files would become inputs of a resumed run)."""
    urls = [absolute_url(u) for u in ([inputs] if isinstance(inputs, str) else inputs)]
    output = absolute_url(output)
    for url in urls:
        if (output.rstrip("/") + "/").startswith(url.rstrip("/") + "/"):
            raise ConfigError(f"output {output} is inside the {what} {url}: choose an output outside it")
    return urls, output


def absolute_url(url: str) -> str:
    """Local paths made absolute: Ray workers do not share the driver's working directory."""
    if "://" in url:
        return url
    return str(Path(url).expanduser().resolve())


def redact(value: Any) -> Any:
    """Storage options without credentials, for the manifest and the report."""
    if isinstance(value, dict):
        return {k: ("***" if SECRET_RE.search(str(k)) and not isinstance(v, dict) else redact(v))
                for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value
