"""An archive's manifest.json read as untrusted data, for verify / restore: its parts
type-checked (`checked_manifest`), and the model it names found among the installed ones or
the one the user gave (`resolve_model`), never opened from a path or URL it records."""

from __future__ import annotations

import re
from typing import Any, Mapping

from m2t_core import bitstream as bs

from pipeline.storage import archive as A


def issue(shard, key, kind: str, message: str) -> dict[str, Any]:
    return {"shard": shard, "key": key, "kind": kind, "message": message}


class ModelUnavailable(RuntimeError):
    pass


def resolve_model(manifest: Mapping[str, Any], override: str | None, storage_options=None) -> str:
    """The model spec (name, path or URL) whose weights are the manifest's; ModelUnavailable
    names the model needed when none is."""
    from m2t_core.registry import MODEL_NAME_RE, find_installed_model

    # Only two places are ever opened: what the user passed (--model) and the installed
    # registry (matched by name and weights hash). The manifest's `source` (a path or URL the
    # compress job used) is shown in messages, never opened: an archive is untrusted.
    info = manifest.get("model") if isinstance(manifest, Mapping) else None
    info = info if isinstance(info, Mapping) else {}
    want_id, want_hash = info.get("id"), info.get("weights_hash")
    if not (isinstance(want_id, str) and MODEL_NAME_RE.match(want_id) and isinstance(want_hash, str)
            and re.fullmatch(r"[0-9a-f]{16}", want_hash)):
        raise ModelUnavailable(f"the manifest's model is malformed (id {want_id!r}, weights hash {want_hash!r}): "
                               "give the model with --model PATH|URL")
    tried = []
    if override:
        try:
            model = A.open_model(override, storage_options=storage_options)
        except Exception as exc:  # not found, unreadable, not a checkpoint
            tried.append(f"{override} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
        else:
            known = {h.hex() for h in model.weights_hashes().values()}  # an archive names its format's
            if model.model_id == want_id and want_hash in known:
                return override
            tried.append(f"{override} ({model.model_id}, weights {', '.join(sorted(known))})")
    path = find_installed_model(want_id, want_hash)
    if path is not None:
        return str(path)
    tried.append(f"installed models named {want_id!r} ($M2T_MODEL_PATH, package weights)")
    raise ModelUnavailable(
        f"the archive needs model {want_id!r} with weights hash {want_hash} "
        f"(sha256 {info.get('weights_sha256')!r}, written from {str(info.get('source'))[:200]!r}, not opened); "
        f"no available checkpoint matches: give it with --model PATH|URL or put it in $M2T_MODEL_PATH "
        f"(tried: {'; '.join(tried[:6])})")


class _Unparsable(str):
    pass


def read_manifest(archive: A.Archive, sign_key: bytes | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The archive's manifest, checked (checked_manifest), and its problems as issues.
    ArchiveIncompleteError when it has none (the compress job has not finished).

    With a signing key (`sign_key`, else $M2T_SIGN_KEY if set) the manifest must carry a valid
    signature by it (pipeline/storage/integrity.py): if not, a `bad_signature` issue and no
    shards (nothing of an archive that fails its signature is read)."""
    from pipeline.storage import integrity

    sign_key = sign_key if sign_key is not None else integrity.sign_key()
    try:
        raw = archive.read_json(A.MANIFEST)
    except A.ArchiveError as exc:
        raise A.ArchiveIncompleteError(f"{exc}: the archive is incomplete or not an m2t archive "
                                       "(finish it with `m2t compress`)") from None
    except (ValueError, UnicodeDecodeError) as exc:  # not JSON: reported like any other malformed manifest
        raw = _Unparsable(f"unparsable JSON ({exc})")
    manifest, problems = checked_manifest(raw)
    if sign_key is not None:
        try:
            integrity.check_signature(raw, sign_key)
        except integrity.IntegrityError as exc:
            problems.append(issue(None, None, exc.kind, f"{exc}; no shard is read"))
            manifest["shards"] = []
    return manifest, problems


def _count_ok(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def checked_manifest(raw: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The parts of a manifest that verify/restore use, type-checked (the archive is untrusted):
    each problem becomes a `bad_manifest` issue and the offending part is left out (a shard
    entry with an unsafe name is never read). Returns (manifest, issues)."""
    if not isinstance(raw, dict):
        what = str(raw) if isinstance(raw, _Unparsable) else f"a JSON {type(raw).__name__}, not an object"
        return {}, [issue(None, None, "bad_manifest", f"manifest.json is {what}: nothing can be checked")]
    problems = []
    manifest = dict(raw)
    for part in ("model", "config"):
        if not isinstance(raw.get(part, {}), dict):
            problems.append(issue(None, None, "bad_manifest", f"manifest.json: {part!r} is a "
                                  f"{type(raw[part]).__name__}, not an object"))
            manifest[part] = {}
    cfg = dict(manifest.get("config", {}))
    if cfg.get("max_pixels") is not None and not (_count_ok(cfg["max_pixels"]) and cfg["max_pixels"] > 0):
        problems.append(issue(None, None, "bad_manifest", f"manifest.json: config max_pixels {cfg['max_pixels']!r} "
                              f"is not a positive integer; using {bs.DEFAULT_MAX_PIXELS}"))
        cfg["max_pixels"] = None
    if not isinstance(cfg.get("parquet_image_column"), (str, type(None))):
        problems.append(issue(None, None, "bad_manifest", "manifest.json: config parquet_image_column is not a string"))
        cfg["parquet_image_column"] = None
    manifest["config"] = cfg
    shards = raw.get("shards", [])
    if not isinstance(shards, list):
        problems.append(issue(None, None, "bad_manifest", f"manifest.json: 'shards' is a {type(shards).__name__}, "
                              "not a list: no shard can be checked"))
        shards = []
    good, seen = [], set()
    for i, entry in enumerate(shards):
        name = entry.get("shard") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not A.SHARD_NAME_RE.match(name):
            problems.append(issue(None, None, "bad_manifest", f"manifest.json: shard entry {i} has an unsafe or "
                                  f"malformed shard name {str(name)[:100]!r} (shard names are 5 to 12 digits); "
                                  "refused, nothing read for it"))
            continue
        if name in seen:
            problems.append(issue(name, None, "bad_manifest", f"manifest.json: shard {name} is listed twice"))
            continue
        seen.add(name)
        if not (_count_ok(entry.get("images")) and _count_ok(entry.get("ok"))):
            problems.append(issue(name, None, "bad_manifest", f"manifest.json: shard {name}'s counts images "
                                  f"{str(entry.get('images'))[:40]!r} / ok {str(entry.get('ok'))[:40]!r} are not "
                                  "non-negative integers; not compared"))
            entry = {k: v for k, v in entry.items() if k not in ("images", "ok")}
        good.append(entry)
    manifest["shards"] = good
    return manifest, problems
