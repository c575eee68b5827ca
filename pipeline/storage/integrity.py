"""Tamper evidence for archives: digests of every index and blob in the manifest, a digest per
row that binds its key to its bitstream, and an optional HMAC-SHA256 signature of the manifest.

* Each shard's stats (and so the manifest's shard entry) record `sha256`: {"bin", "parquet"},
  the SHA-256 of shards/<shard>.bin and shards/<shard>.parquet as written; the manifest
  records `keys_sha256` of keys.parquet. `m2t verify` recomputes them all.
* Each ok row records `digest` = SHA-256(key as UTF-8, a NUL byte, the bitstream): a row that
  points at another key's stream (even with that stream's CRC-32 and digest) does not match,
  found by `m2t get` from the one row it reads.
* With a key (`--sign-key-file PATH` or $M2T_SIGN_KEY, at least 16 bytes) `m2t compress`
  signs the manifest (`signature`: HMAC-SHA256 over its canonical JSON, every field but the
  signature); `m2t verify`, `m2t get` and the readers given a key refuse a manifest whose
  signature does not match (or that has none) and an index or blob whose digest is not the
  signed manifest's. Without a key, digests find accidental damage and naive edits, not an
  attacker who rewrites the manifest too. docs/archive_format.md says what is protected.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from typing import Any, Mapping

from pipeline.errors import UsageError
from pipeline.storage import archive as A

SIGN_KEY_ENV = "M2T_SIGN_KEY"
MIN_KEY_BYTES = 16
SIGNATURE_ALGORITHM = "HMAC-SHA256"
READ_CHUNK = 8 << 20


class IntegrityError(A.ArchiveError):
    """A digest or signature does not match: the archive (or this part of it) was changed
    after it was written. `kind` is verify's issue kind."""

    def __init__(self, message: str, kind: str = "digest_mismatch"):
        super().__init__(message)
        self.kind = kind


def sign_key(path: str | None = None) -> bytes | None:
    """The user's signing key: the bytes of `path` (a trailing newline dropped), else
    $M2T_SIGN_KEY, else None. UsageError if it is shorter than MIN_KEY_BYTES."""
    if path:
        try:
            with open(path, "rb") as f:
                key = f.read().rstrip(b"\r\n")
        except OSError as exc:
            raise UsageError(f"cannot read the signing key file {path}: {exc}") from None
        where = path
    elif os.environ.get(SIGN_KEY_ENV):
        key, where = os.environ[SIGN_KEY_ENV].encode(), f"${SIGN_KEY_ENV}"
    else:
        return None
    if len(key) < MIN_KEY_BYTES:
        raise UsageError(f"the signing key in {where} has {len(key)} bytes; at least {MIN_KEY_BYTES} are needed "
                         "(e.g. `openssl rand -hex 32`)")
    return key


def stream_digest(key: str, data: bytes) -> str:
    """A row's `digest`: SHA-256 of key, NUL, bitstream (keys never hold NUL: compress refuses them)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass") + b"\0" + bytes(data)).hexdigest()


def file_sha256(archive: A.Archive, path: str) -> str:
    """SHA-256 of a file of the archive, read in chunks (memory stays small)."""
    digest = hashlib.sha256()
    with archive.fs.open(path, "rb") as f:
        while chunk := f.read(READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _canonical(manifest: Mapping[str, Any]) -> bytes:
    # The manifest as stored (non-finite floats as strings: archive.dumps), without its signature.
    body = json.loads(A.dumps({k: v for k, v in manifest.items() if k != "signature"}))
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def key_id(key: bytes) -> str:
    """Names a key without revealing it (which key signed: for messages)."""
    return hashlib.sha256(b"m2t-key-id\0" + key).hexdigest()[:16]


def sign_manifest(manifest: dict[str, Any], key: bytes) -> dict[str, Any]:
    """The manifest with its `signature`."""
    value = hmac.new(key, _canonical(manifest), hashlib.sha256).hexdigest()
    return {**manifest, "signature": {"algorithm": SIGNATURE_ALGORITHM, "key_id": key_id(key), "value": value}}


def check_signature(manifest: Any, key: bytes) -> None:
    """IntegrityError (kind bad_signature) unless `manifest` (as read, untrusted) carries a
    valid signature by `key`, and records the digests a signed archive must have."""
    sig = manifest.get("signature") if isinstance(manifest, dict) else None
    if not isinstance(sig, dict) or sig.get("algorithm") != SIGNATURE_ALGORITHM or not isinstance(sig.get("value"), str):
        raise IntegrityError("manifest.json is not signed (a signing key was given: an unsigned archive is refused)",
                             "bad_signature")
    want = hmac.new(key, _canonical(manifest), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(want, sig["value"]):
        raise IntegrityError(f"manifest.json's signature does not match the given key (key id {key_id(key)}, the "
                             f"manifest names {str(sig.get('key_id'))[:16]!r}): the manifest was changed or signed "
                             "with another key", "bad_signature")
    shards = manifest.get("shards")
    missing = [str(s.get("shard"))[:20] for s in shards if not _digests(s)] if isinstance(shards, list) else ["all"]
    if missing or not isinstance(manifest.get("keys_sha256"), str):
        raise IntegrityError(f"the signed manifest records no digest for keys.parquet or shard(s) {missing[:5]}: "
                             "nothing ties them to the signature", "bad_signature")


def _digests(entry: Any) -> dict[str, str] | None:
    sha = entry.get("sha256") if isinstance(entry, dict) else None
    if isinstance(sha, dict) and all(isinstance(sha.get(n), str) for n in ("bin", "parquet")):
        return sha
    return None


def check_index_digest(index: bytes, shard: str, entry: Any) -> None:
    """IntegrityError unless shards/<shard>.parquet's bytes are what the manifest's entry
    records (an entry without digests, from an older archive, checks nothing)."""
    sha = _digests(entry)
    if sha is not None and hashlib.sha256(index).hexdigest() != sha["parquet"]:
        raise IntegrityError(f"shard {shard}: shards/{shard}.parquet is not the index the manifest records (SHA-256 "
                             f"{hashlib.sha256(index).hexdigest()[:16]}..., manifest {sha['parquet'][:16]}...): "
                             "rows were changed, added, removed or remapped")


def blob_digest_problem(archive: A.Archive, shard: str, entry: Any) -> str | None:
    """Why shards/<shard>.bin is not the blob the manifest's entry records, or None."""
    sha = _digests(entry)
    if sha is None:
        return None
    got = file_sha256(archive, archive.shard_path(shard, ".bin"))
    if got != sha["bin"]:
        return (f"shard {shard}: shards/{shard}.bin is not the blob the manifest records (SHA-256 {got[:16]}..., "
                f"manifest {sha['bin'][:16]}...)")
    return None


def keys_digest_problem(archive: A.Archive, manifest: Mapping[str, Any]) -> str | None:
    """Why keys.parquet is not the one the manifest records, or None (no digest recorded)."""
    want = manifest.get("keys_sha256")
    if not isinstance(want, str):
        return None
    try:
        got = file_sha256(archive, archive.path(A.KEYS_INDEX))
    except FileNotFoundError:
        return f"{A.KEYS_INDEX} is missing (the manifest records its SHA-256)"
    if got != want:
        return (f"{A.KEYS_INDEX} is not the one the manifest records (SHA-256 {got[:16]}..., manifest {want[:16]}...): "
                "`m2t get` would look keys up in a changed index")
    return None


def signed_row(archive: A.Archive, row: dict[str, Any], key: str, sign_key: bytes) -> dict[str, Any]:
    """`key`'s row from its shard's index, once the manifest's signature matches `sign_key`, the
    shard index's bytes are the ones the signed manifest records and pass index_checks, and
    keys.parquet's row agrees with it (IntegrityError / ArchiveError otherwise)."""
    from pipeline.storage import index_checks

    shard = A.check_shard_name(row["shard"])
    try:
        manifest = json.loads(archive.fs.cat_file(archive.path(A.MANIFEST)))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"manifest.json cannot be read ({type(exc).__name__}): a signing key was given",
                             "bad_signature") from None
    check_signature(manifest, sign_key)
    entry = next((s for s in manifest["shards"] if isinstance(s, dict) and s.get("shard") == shard), None)
    if entry is None:
        raise IntegrityError(f"key {key!r}: shard {shard} is not in the signed manifest")
    try:
        index = index_checks.read_index_bytes(archive, shard)
    except FileNotFoundError:
        raise A.ArchiveError(f"key {key!r}: shards/{shard}.parquet is missing") from None
    check_index_digest(index, shard, entry)
    summary = index_checks.check_shard_index(index, shard, int(archive.fs.size(archive.shard_path(shard, ".bin"))))
    fields = ("offset", "length", "crc32", "step_ends", "digest", "height", "width")
    for number, found in enumerate(index_checks.iter_index_rows(index, ["key", "status", *fields])):
        if found["key"] == key and found["status"] == "ok" and number not in summary.bad_rows:
            if any(row.get(n) is not None and row[n] != found[n] for n in fields):
                raise IntegrityError(f"key {key!r}: keys.parquet's row disagrees with shard {shard}'s signed "
                                     "index (keys.parquet was changed)")
            return {**row, **found}
    raise IntegrityError(f"key {key!r} is not an ok row of shard {shard}'s signed index "
                         "(keys.parquet was changed)")
