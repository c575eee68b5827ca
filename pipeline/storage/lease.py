"""A lease on an archive: one writing job at a time, and fencing for the workers of a dead one.

    ARCHIVE/lease.json   {"format": "m2t-lease", "owner": <random token>, "host", "pid",
                          "started", "heartbeat" (unix seconds), "heartbeat_at", "timeout_s", "command"}

`m2t compress` takes the lease before it touches an archive and gives it back when it ends
(also on errors). While it runs, a thread renews the heartbeat every `timeout_s / 4` seconds.

* A second job on the same archive is refused (`LeaseHeldError`, naming the holder's host,
  pid, start and last heartbeat).
* A lease whose heartbeat is older than its `timeout_s` is *stale*: its job is presumed dead.
  It is still refused unless the new job is started with `--break-lease` (a person decides; a
  live but stalled job is not overrun silently). A live lease cannot be broken. A lease whose
  holder ran on this host and whose process is gone (a killed driver) is taken over at once,
  so that rerunning the same command resumes.
* Fencing: the job's owner token travels with every shard. A worker checks that the archive's
  lease still names its token before it clears a shard, before it moves the shard's data into
  place and before it writes the stats file that marks the shard complete (`check_holder`).
  Orphaned actors of a killed driver therefore stop committing as soon as a new job holds the
  lease. (An actor that passed its check an instant before the lease changed hands can finish
  that one write; the new job's final check of every shard before it writes the manifest
  catches the result.)

Atomic creation:
* local filesystems: the whole file is hard-linked into place (`link()` fails if the name exists,
  like `O_EXCL`, and no reader sees a half-written lease); renewals and release compare the owner
  token first (read, compare, replace: only a stale lease is ever taken over, so its holder is
  not renewing it).
* S3 (s3fs): conditional writes. Creation is `PutObject` with `If-None-Match: *`, renewal
  `PutObject` with `If-Match: <our ETag>`, release and breaking `DeleteObject` with
  `If-Match`. AWS S3 supports these (since 2024/2025), as do MinIO and moto. A store that
  ignores the headers gives no atomicity: the lease is then read back after creation, which
  catches most but not all races between two jobs started at the same moment.
* other fsspec filesystems: existence check, write, read back (best effort, not atomic; a
  warning says so).
Staleness compares the heartbeat (the holder's clock) with this machine's clock: clocks must
agree to well within `timeout_s`.
"""

from __future__ import annotations

import abc
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from pipeline.storage.sources import filesystem, join_url

log = logging.getLogger(__name__)

LEASE = "lease.json"
LEASE_FORMAT = "m2t-lease"
DEFAULT_TIMEOUT_S = 120.0


class LeaseError(RuntimeError):
    """The archive's lease cannot be taken or is no longer ours."""


class LeaseHeldError(LeaseError):
    """Another job holds the archive's lease."""


class LeaseLostError(LeaseError):
    """This job (or worker) no longer holds the archive's lease: it must not write."""


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


@dataclass
class LeaseInfo:
    owner: str
    host: str
    pid: int
    started: str
    heartbeat: float  # unix seconds of the last renewal (the holder's clock)
    timeout_s: float
    command: str = ""
    format: str = LEASE_FORMAT
    heartbeat_at: str = ""

    @classmethod
    def new(cls, timeout_s: float) -> "LeaseInfo":
        now = time.time()
        return cls(owner=uuid.uuid4().hex, host=socket.gethostname(), pid=os.getpid(), started=_iso(now),
                   heartbeat=now, timeout_s=float(timeout_s),
                   command=os.path.basename(sys.argv[0]) if sys.argv else "",  # not its arguments: they may hold credentials
                   heartbeat_at=_iso(now))

    @classmethod
    def parse(cls, data: bytes, where: str) -> "LeaseInfo":
        try:
            raw = json.loads(data)
            if raw.get("format") != LEASE_FORMAT:
                raise ValueError(f"format is {raw.get('format')!r}")
            known = {f for f in cls.__dataclass_fields__}
            return cls(**{k: v for k, v in raw.items() if k in known})
        except (ValueError, TypeError, AttributeError) as exc:
            raise LeaseError(f"{where} is not a valid lease file ({exc}): if no job is running on this "
                             "archive, delete it") from None

    def to_bytes(self) -> bytes:
        return (json.dumps(asdict(self), indent=1) + "\n").encode()

    def age(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.heartbeat

    def expired(self, now: float | None = None) -> str | None:
        """Why the lease is stale (no heartbeat for longer than its timeout), or None."""
        age = self.age(now)
        if age > self.timeout_s:
            return f"its last heartbeat was {age:.0f} s ago (timeout {self.timeout_s:.0f} s)"
        return None

    def holder_gone(self) -> str | None:
        """Why the holder is certainly dead (it ran on this host and its process is gone), or None."""
        if self.host == socket.gethostname() and not _pid_alive(self.pid):
            return f"its process {self.pid} is no longer running on this host"
        return None

    def describe(self, now: float | None = None) -> str:
        return (f"job {self.owner[:8]} on {self.host} (pid {self.pid}), started {self.started}, "
                f"last heartbeat {self.age(now):.0f} s ago")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or we cannot tell: assume alive
    return True


# ====================================================================== storage back ends


class _Store(abc.ABC):
    """Read / create-exclusively / replace-if-ours / delete-if-ours one small object; one
    subclass per kind of storage (local, S3, best-effort fsspec)."""

    atomic = True

    def __init__(self, fs, path: str):
        self.fs, self.path = fs, path

    @abc.abstractmethod
    def read(self) -> tuple[LeaseInfo, Any] | None:  # (info, version token) or None if absent
        ...

    @abc.abstractmethod
    def create(self, info: LeaseInfo) -> Any:  # returns the version token; raises FileExistsError
        ...

    @abc.abstractmethod
    def replace(self, info: LeaseInfo, version: Any) -> Any:  # raises LeaseLostError if not `version`
        ...

    @abc.abstractmethod
    def delete(self, version: Any) -> bool:  # False if it was not `version` (or absent)
        ...


class _LocalStore(_Store):
    def read(self):
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        info = LeaseInfo.parse(data, self.path)
        return info, info.owner

    def create(self, info):
        # The complete file is written under a name of its own, then hard-linked to the lease's
        # name: link() fails if the name exists (like O_EXCL) and, unlike O_EXCL + write, no
        # reader ever sees an empty or half-written lease.
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = f"{self.path}.{info.owner[:8]}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(info.to_bytes())
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)  # FileExistsError if held
        except FileNotFoundError:  # the holder's cleanup of stale temporaries took ours: it is held
            raise FileExistsError(self.path) from None
        except (AttributeError, NotImplementedError, PermissionError) as exc:  # no hard links here
            log.debug("hard link failed (%s): O_EXCL", exc)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(info.to_bytes())
        finally:
            os.unlink(tmp)
        return info.owner

    def replace(self, info, version):
        current = self.read()
        if current is None or current[1] != version:
            raise LeaseLostError(self._lost(current))
        tmp = f"{self.path}.{info.owner[:8]}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(info.to_bytes())
        os.replace(tmp, self.path)
        return info.owner

    def delete(self, version):
        current = self.read()
        if current is None or current[1] != version:
            return False
        os.unlink(self.path)
        return True

    def _lost(self, current) -> str:
        return "the lease file is gone" if current is None else f"the lease is now held by {current[0].describe()}"


class _S3Store(_Store):
    """Conditional writes: If-None-Match on create, If-Match on replace and delete."""

    def __init__(self, fs, path):
        super().__init__(fs, path)
        self.bucket, self.key, _ = fs.split_path(path)

    def _call(self, method: str, **kwargs):
        return self.fs.call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs)

    @staticmethod
    def _code(exc: BaseException) -> str:
        """The S3 error code (s3fs turns botocore's ClientError into an OSError; the original
        is its __cause__)."""
        for e in (exc, exc.__cause__):
            response = getattr(e, "response", None) or {}
            code = str(response.get("Error", {}).get("Code", "")) or str(
                response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if code:
                return code
        return ""

    def read(self):
        from fsspec.asyn import sync

        async def get():
            out = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            body = out["Body"]
            try:
                return await body.read(), out["ETag"]
            finally:
                body.close()

        try:
            data, etag = sync(self.fs.loop, get)
        except FileNotFoundError:
            return None
        except Exception as exc:
            if self._code(exc) in ("NoSuchKey", "404"):
                return None
            raise
        return LeaseInfo.parse(data, f"s3://{self.bucket}/{self.key}"), etag

    def _put(self, info: LeaseInfo, **condition) -> str:
        try:
            out = self._call("put_object", Body=info.to_bytes(), ContentType="application/json", **condition)
        except Exception as exc:
            code = self._code(exc)
            # 412: the condition failed; 409: a concurrent conditional write won the race.
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409") or \
                    isinstance(exc, FileExistsError):
                if "IfNoneMatch" in condition:
                    raise FileExistsError(self.path) from None
                raise LeaseLostError(self._lost()) from None
            if "IfMatch" in condition and code in ("NoSuchKey", "404") or isinstance(exc, FileNotFoundError):
                raise LeaseLostError("the lease file is gone") from None
            raise
        finally:
            self.fs.invalidate_cache(self.path)
        return out["ETag"]

    def create(self, info):
        return self._put(info, IfNoneMatch="*")

    def replace(self, info, version):
        return self._put(info, IfMatch=version)

    def delete(self, version):
        try:
            self._call("delete_object", IfMatch=version)
        except FileNotFoundError:
            return False
        except Exception as exc:
            if self._code(exc) in ("PreconditionFailed", "412", "NoSuchKey", "404", "ConditionalRequestConflict", "409"):
                return False
            raise
        finally:
            self.fs.invalidate_cache(self.path)
        return True

    def _lost(self) -> str:
        try:
            current = self.read()
        except Exception:  # only for the message
            current = None
        return "the lease file is gone" if current is None else f"the lease is now held by {current[0].describe()}"


class _GenericStore(_Store):
    """Any other fsspec filesystem: not atomic (check, write, read back)."""

    atomic = False

    def read(self):
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        info = LeaseInfo.parse(data, self.path)
        return info, info.owner

    def create(self, info):
        self.fs.invalidate_cache(self.path)
        if self.fs.exists(self.path):
            raise FileExistsError(self.path)
        self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(self.path, info.to_bytes())
        return info.owner

    def replace(self, info, version):
        current = self.read()
        if current is None or current[1] != version:
            raise LeaseLostError("the lease file is gone" if current is None
                                 else f"the lease is now held by {current[0].describe()}")
        self.fs.pipe_file(self.path, info.to_bytes())
        return info.owner

    def delete(self, version):
        current = self.read()
        if current is None or current[1] != version:
            return False
        self.fs.rm_file(self.path)
        return True


def _store(url: str, storage_options) -> tuple[_Store, str]:
    fs, root = filesystem(url.rstrip("/"), storage_options)
    path = "/".join([root.rstrip("/"), LEASE])
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if {"file", "local"} & set(protocols):
        return _LocalStore(fs, path), join_url(url, LEASE)
    if {"s3", "s3a"} & set(protocols) and hasattr(fs, "call_s3"):
        return _S3Store(fs, path), join_url(url, LEASE)
    return _GenericStore(fs, path), join_url(url, LEASE)


# ====================================================================== the lease


class ArchiveLease:
    """The lease of one job on one archive. Use as a context manager, or acquire()/release().

        with ArchiveLease(url, storage_options, timeout_s=120) as lease:
            job["lease_owner"] = lease.owner      # workers: check_holder(url, options, owner)
            ...
    """

    def __init__(self, url: str, storage_options: Mapping[str, Mapping[str, Any]] | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, break_stale: bool = False,
                 heartbeat_s: float | None = None):
        if not timeout_s > 0:
            raise ValueError(f"lease timeout must be > 0 s, got {timeout_s}")
        self.url = url.rstrip("/")
        self.store, self.where = _store(self.url, storage_options)
        self.timeout_s = float(timeout_s)
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else self.timeout_s / 4
        self.break_stale = break_stale
        self.info: LeaseInfo | None = None
        self.version: Any = None
        self.broken: LeaseInfo | None = None  # the stale lease this job broke, if any
        self.lost: str | None = None  # why the heartbeat found the lease gone
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def owner(self) -> str:
        assert self.info is not None, "lease not acquired"
        return self.info.owner

    # -------------------------------------------------------------- taking it

    def acquire(self) -> "ArchiveLease":
        if not self.store.atomic:
            log.warning("%s: this filesystem has no atomic create; the lease cannot fully prevent two "
                        "jobs started at the same moment", self.where)
        info = LeaseInfo.new(self.timeout_s)
        for _ in range(3):
            try:
                self.version = self.store.create(info)
            except FileExistsError:
                self._take_over_stale()
                continue
            self.info = info
            current = self.store.read()  # read back: catches stores that ignore conditional writes
            if current is None or current[0].owner != info.owner:
                self.info = None
                raise LeaseHeldError(f"{self.url} is in use: another job took its lease at the same moment"
                                     + (f" ({current[0].describe()})" if current else ""))
            self.version = current[1] if isinstance(self.store, _S3Store) else self.version
            self._start_heartbeat()
            log.info("took the lease on %s (job %s)%s", self.url, info.owner[:8],
                     f"; broke the stale lease of {self.broken.describe()}" if self.broken else "")
            return self
        raise LeaseHeldError(f"{self.url} is in use: could not take its lease (another job keeps taking it)")

    def _take_over_stale(self) -> None:
        try:
            current = self.store.read()
        except LeaseError as exc:  # unreadable (e.g. a crash mid-write on a non-atomic store)
            if not self.break_stale:
                raise LeaseHeldError(f"{exc}; or run again with --break-lease") from None
            log.warning("deleting the unreadable lease %s (--break-lease)", self.where)
            self.store.fs.rm_file(self.store.path)
            return
        if current is None:
            return  # released meanwhile: try to create again
        held, version = current
        gone, expired = held.holder_gone(), held.expired()
        if gone is None and expired is None:
            raise LeaseHeldError(
                f"{self.url} is in use by another m2t compress: {held.describe()} ({self.where}); two jobs "
                f"must not write one archive. Wait for it to finish, or stop it; a lease whose holder died "
                f"becomes stale {held.timeout_s:.0f} s after its last heartbeat and can then be broken "
                "with --break-lease")
        # A holder that certainly died (its process is gone from this host: a killed driver) is
        # taken over at once, so that "run the same command again" resumes. One that merely went
        # silent may be alive elsewhere: a person decides (--break-lease).
        if gone is None and not self.break_stale:
            raise LeaseHeldError(
                f"{self.url} has a stale lease: {held.describe()}; {expired}. If no job is writing this archive "
                "any more, run again with --break-lease (workers of the old job that are still running are "
                "then fenced off: they cannot commit shards)")
        if not self.store.delete(version):
            return  # it changed under us (renewed or broken by someone else): look again
        self.broken = held
        log.warning("took over the stale lease on %s: %s; %s", self.url, held.describe(), gone or expired)

    # -------------------------------------------------------------- keeping it

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="m2t-lease-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.renew()
            except LeaseLostError as exc:
                self.lost = str(exc)
                log.error("lost the lease on %s: %s", self.url, exc)
                return
            except Exception as exc:  # a transient I/O error: try again at the next beat
                log.warning("lease heartbeat on %s failed: %s", self.url, exc)

    def renew(self) -> None:
        with self._lock:
            if self.info is None:
                raise LeaseLostError("the lease was released")
            now = time.time()
            info = LeaseInfo(**{**asdict(self.info), "heartbeat": now, "heartbeat_at": _iso(now)})
            self.version = self.store.replace(info, self.version)
            self.info = info

    def check(self) -> None:
        """Raise LeaseLostError unless the archive's lease is still this job's."""
        if self.lost:
            raise LeaseLostError(f"{self.url}: {self.lost}")
        check_holder(self.url, None, self.owner, store=self.store)

    # -------------------------------------------------------------- giving it back

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        with self._lock:
            if self.info is None:
                return
            try:
                if not self.store.delete(self.version):
                    log.warning("the lease on %s was no longer ours at release (%s)", self.url, self.lost or "taken over")
            except Exception as exc:  # never hide the job's own error behind this one
                log.warning("could not release the lease on %s: %s (it becomes stale after %.0f s)",
                            self.url, exc, self.timeout_s)
            self.info = None

    def __enter__(self) -> "ArchiveLease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def read_lease(url: str, storage_options=None) -> LeaseInfo | None:
    current = _store(url, storage_options)[0].read()
    return None if current is None else current[0]


def check_holder(url: str, storage_options, owner: str, what: str = "", store: _Store | None = None) -> None:
    """Fencing for workers: raise LeaseLostError unless the archive's lease names `owner`."""
    store = store or _store(url, storage_options)[0]
    current = store.read()
    if current is not None and current[0].owner == owner:
        return
    holder = "nobody holds it now" if current is None else f"it is now held by {current[0].describe()}"
    raise LeaseLostError(f"{what or 'not written'}: this worker's job ({owner[:8]}) no longer holds the lease on "
                         f"{url} ({holder}); the job was stopped or its lease was broken")
