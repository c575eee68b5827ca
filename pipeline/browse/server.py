"""`m2t browse ARCHIVE`: a local web page to browse an archive's images.

The server reads every completed shard's index (shards/<shard>.parquet) once into one Arrow
table (a few compact columns, not a Python object per row), and serves:

    GET /                           the page (pipeline/browse/static/: plain HTML, CSS, JS)
    GET /api/summary                archive URL, row counts by status, preview steps, warnings
    GET /api/rows?offset=&limit=&status=&q=
                                    one page of rows (sorted by key); status: all|ok|error|duplicate,
                                    q: key substring (case-sensitive); the total that match
    GET /preview/<key>.png          a preview decoded from the first K coding steps of the stream
                                    (one prefix read), scaled down to at most PREVIEW_MAX_SIDE
    GET /thumb/<key>.png            the full decode scaled down to at most PREVIEW_MAX_SIDE: what
                                    a tile shows once its preview is up
    GET /image/<key>.png            the image at full quality

Keys are URL-encoded path segments (they may hold '/', spaces, unicode). An unknown key, or
one that was not archived, is a 404 with a JSON message; a decode failure a 500 with the
message. Decoded PNGs are kept in a small LRU (bounded in bytes). Decoding runs on a small
pool of threads (DecodePool, `--decode-workers`, default 2), requests first: serving a preview
also queues its tile's full decode behind them (at most MAX_PREFETCH queued), so the cache is
filled while the page shows previews and the server stays responsive. The model is loaded
once per process by the registry's cache.

Binds 127.0.0.1 by default; the page has no authentication, so another host is allowed but
warned about. Requests whose Host header is not a loopback name are refused while bound to
loopback (a DNS-rebinding guard).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import heapq
import io
import itertools
import ipaddress
import json
import logging
import math
import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np


from pipeline.storage.archive import (EXIT_OK, EXIT_USAGE, Archive, ArchiveError, SHARDS_DIR, index_schema, read_parquet)

STATIC_DIR = Path(__file__).resolve().parent / "static"
DEFAULT_PORT = 8765
DEFAULT_PREVIEW_STEPS = 4
PREVIEW_MAX_SIDE = 384  # previews are scaled down to this (tiles are ~200 CSS px; HiDPI screens)
DEFAULT_CACHE_BYTES = 64 << 20
MAX_PAGE = 1000  # rows per /api/rows request at most
DEFAULT_DECODE_WORKERS = 2  # decoding threads (torch releases the GIL in its kernels)
MAX_PREFETCH = 32  # full decodes queued ahead of the page's requests at most: bounds the queue
KINDS = ("preview", "thumb", "full")  # a preview of K steps, the full decode scaled to a tile, the image
STATUSES = ("ok", "error", "duplicate")
# The index columns the page needs (never `source`: it can be long, and is not shown).
COLUMNS = ("key", "shard", "status", "error", "length", "width", "height", "source_bytes", "bpp", "psnr")
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


class NotFound(LookupError):
    """A key that is not in the archive, or was not archived (no image to show)."""


# ====================================================================== the index


def load_index(archive: Archive):
    """Every completed shard's index rows (COLUMNS), sorted by key then shard, as one Arrow
    table; and the warnings to show (shards skipped). Shard names come from the stats files
    and are checked (Archive.shard_path) before any path is built; paths in the index are
    never used."""
    import pyarrow as pa

    schema = index_schema()
    want = pa.schema([schema.field(c) for c in COLUMNS])
    warnings: list[str] = []
    tables = []
    for shard in sorted(archive.completed_shards()):
        try:
            path = archive.shard_path(shard, ".parquet")
        except ArchiveError as exc:
            warnings.append(str(exc))
            continue
        try:
            table = read_parquet(archive.fs, path)
            missing = [c for c in COLUMNS if c not in table.schema.names]
            if missing:
                raise ArchiveError(f"columns missing: {', '.join(missing)}")
            table = table.select(list(COLUMNS)).cast(want)
        except FileNotFoundError:
            warnings.append(f"shard {shard}: {SHARDS_DIR}/{shard}.parquet is missing (skipped)")
            continue
        except Exception as exc:  # a malformed index: the rest of the archive is still shown
            warnings.append(f"shard {shard}: {SHARDS_DIR}/{shard}.parquet is not readable "
                            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; skipped)")
            continue
        tables.append(table)
    table = pa.concat_tables(tables) if tables else want.empty_table()
    table = table.sort_by([("key", "ascending"), ("shard", "ascending")]).combine_chunks()
    if not tables and not archive.looks_like_archive():
        raise ArchiveError(f"{archive.url} is not an m2t archive (no {SHARDS_DIR}/, manifest.json or report.json)")
    return table, warnings


def _number(value):
    """JSON-safe: inf -> "inf" (strict JSON has no Infinity), NaN -> null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value


# ====================================================================== decoding


class PngCache:
    """A least-recently-used cache of PNG bytes, bounded in bytes (thread-safe)."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: collections.OrderedDict[Any, bytes] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= len(old)
            self._items[key] = data
            self.bytes += len(data)
            while self.bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self.bytes -= len(dropped)

    def __len__(self) -> int:
        return len(self._items)


def png_bytes(rgb: np.ndarray, max_side: int | None = None) -> bytes:
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(rgb))
    if max_side and max(image.size) > max_side:
        scale = max_side / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # fast: these are served once, then cached
    return buf.getvalue()


class DecodePool:
    """A few daemon threads that run jobs by priority (0: a request waits on it; 1: a prefetch),
    then in submission order; the same job (by key) queued twice runs once."""

    def __init__(self, workers: int):
        if workers < 1:
            raise ValueError(f"decode workers must be >= 1, got {workers}")
        self.workers = workers
        self._queue: list = []  # heap of (priority, order, key, fn, future)
        self._futures: dict[Any, concurrent.futures.Future] = {}  # queued or running, by key
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []

    def submit(self, key, fn: Callable[[], Any], priority: int = 0) -> concurrent.futures.Future:
        with self._cond:
            future = self._futures.get(key)
            if future is None:
                future = self._futures[key] = concurrent.futures.Future()
                heapq.heappush(self._queue, (priority, next(self._order), key, fn, future))
            elif priority == 0:  # a request now waits on a prefetch: move it up
                for i, item in enumerate(self._queue):
                    if item[2] == key and item[0] > 0:
                        self._queue[i] = (0, *item[1:])
                        heapq.heapify(self._queue)
                        break
            if len(self._threads) < self.workers:  # started on first use
                thread = threading.Thread(target=self._work, name=f"m2t-decode-{len(self._threads)}", daemon=True)
                self._threads.append(thread)
                thread.start()
            self._cond.notify()
        return future

    def queued(self, priority: int) -> int:
        with self._cond:
            return sum(1 for item in self._queue if item[0] == priority)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                _, _, key, fn, future = heapq.heappop(self._queue)
            try:
                if future.set_running_or_notify_cancel():
                    future.set_result(fn())
            except BaseException as exc:  # the caller sees it (a decode failure: a 500)
                future.set_exception(exc)
            finally:
                with self._cond:
                    self._futures.pop(key, None)


class Browser:
    """The archive as the page sees it: the index in memory, decoding on a pool with a cache."""

    def __init__(self, archive_url: str, model: str | None = None, storage_options=None,
                 preview_steps: int = DEFAULT_PREVIEW_STEPS, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 get_image: Callable | None = None, decode_workers: int = DEFAULT_DECODE_WORKERS):
        import pyarrow.compute as pc

        self.archive = Archive(archive_url, storage_options)
        if not self.archive.exists():
            raise ArchiveError(f"{archive_url} not found")
        self.archive_url = archive_url
        self.model = model
        self.storage_options = storage_options
        if preview_steps < 0:
            raise ValueError(f"--preview-steps must be >= 0, got {preview_steps}")
        self.preview_steps = preview_steps
        self.table, self.warnings = load_index(self.archive)
        self.keys = self.table.column("key")
        self.status = self.table.column("status")
        self.counts = {s: int(pc.sum(pc.equal(self.status, s)).as_py() or 0) for s in STATUSES}
        self.cache = PngCache(cache_bytes)
        self.pool = DecodePool(decode_workers)
        if get_image is None:
            from pipeline.storage import archive as _archive
            get_image = _archive.get_image
        self._get_image = get_image
        try:
            self.manifest = self.archive.read_json("manifest.json")
        except Exception:
            self.manifest = None
            if len(self.table):
                self.warnings.append("no manifest.json: the archive is incomplete (keys.parquet, which "
                                     "decoding looks keys up in, may be missing or stale)")

    # -------------------------------------------------------------- rows

    def summary(self) -> dict[str, Any]:
        model = (self.manifest or {}).get("model")
        if isinstance(model, dict):
            model = model.get("name") or model.get("model_id") or model.get("source")
        return {
            "archive": self.archive_url,
            "rows": len(self.table),
            "counts": self.counts,
            "preview_steps": self.preview_steps,
            "model": self.model or (model if isinstance(model, str) else None),
            "complete": self.manifest is not None,
            "warnings": list(self.warnings),
        }

    def select(self, status: str = "all", q: str = ""):
        """Row positions (an int64 numpy array) that match the status and key substring."""
        import pyarrow.compute as pc

        if status not in ("all", *STATUSES):
            raise ValueError(f"status must be one of all, {', '.join(STATUSES)}; got {status!r}")
        mask = None
        if status != "all":
            mask = pc.equal(self.status, status)
        if q:
            found = pc.match_substring(self.keys, q)
            mask = found if mask is None else pc.and_(mask, found)
        if mask is None:
            return np.arange(len(self.table), dtype=np.int64)
        return np.flatnonzero(mask.to_numpy(zero_copy_only=False).astype(bool, copy=False))

    def rows(self, offset: int = 0, limit: int = 100, status: str = "all", q: str = "") -> dict[str, Any]:
        if offset < 0 or not 0 < limit <= MAX_PAGE:
            raise ValueError(f"offset must be >= 0 and 0 < limit <= {MAX_PAGE} (got offset {offset}, limit {limit})")
        picked = self.select(status, q)
        page = picked[offset:offset + limit]
        out = []
        if len(page):
            for i, row in zip(page.tolist(), self.table.take(page).to_pylist()):
                out.append({"row": i, **{k: _number(v) for k, v in row.items()}})
        return {"total": int(len(picked)), "offset": offset, "limit": limit, "status": status, "q": q, "rows": out}

    def row_of(self, key: str) -> dict[str, Any]:
        """The key's row: the `ok` one when the key was duplicated. NotFound if absent."""
        import pyarrow.compute as pc

        found = np.flatnonzero(pc.equal(self.keys, key).to_numpy(zero_copy_only=False).astype(bool, copy=False))
        if not len(found):
            raise NotFound(f"key {key!r} is not in the archive")
        rows = self.table.take(found).to_pylist()
        ok = [r for r in rows if r["status"] == "ok"]
        return ok[0] if ok else rows[0]

    # -------------------------------------------------------------- images

    def png(self, key: str, kind: str) -> bytes:
        """The PNG of `key`, cached: kind "preview" (K steps, scaled down), "thumb" (the full
        decode, scaled down) or "full". NotFound if the key has no image; other exceptions
        are decode failures. Serving a preview queues the tile's thumb behind the requests."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        row = self.row_of(key)
        if row["status"] != "ok":
            raise NotFound(f"key {key!r} was not archived (status {row['status']}): {row['error']}")
        data = self.cache.get(self._cache_key(key, kind))
        if data is None:
            data = self._queue(key, kind, priority=0).result()
        if kind == "preview" and self.cache.get(self._cache_key(key, "thumb")) is None \
                and self.pool.queued(priority=1) < MAX_PREFETCH:
            self._queue(key, "thumb", priority=1)
        return data

    def _cache_key(self, key: str, kind: str):
        return (kind, self.preview_steps, key) if kind == "preview" else (kind, key)

    def _queue(self, key: str, kind: str, priority: int) -> concurrent.futures.Future:
        cache_key = self._cache_key(key, kind)

        def render() -> bytes:
            data = self.cache.get(cache_key)  # made by an earlier job while this one was queued
            if data is None:
                data = png_bytes(self._decode(key, kind == "preview"), None if kind == "full" else PREVIEW_MAX_SIDE)
                self.cache.put(cache_key, data)
            return data

        return self.pool.submit(cache_key, render, priority)

    def _decode(self, key: str, preview: bool) -> np.ndarray:
        return self._get_image(self.archive_url, key, model=self.model, storage_options=self.storage_options,
                               steps=self.preview_steps if preview else None)


# ====================================================================== the web app


def make_app(browser: Browser, allowed_hosts: set[str] | None = None):
    """The Flask app over `browser`. allowed_hosts: host names the Host header may carry
    (None: any)."""
    from flask import Flask, jsonify, request, send_from_directory
    from werkzeug.routing import PathConverter

    class KeyConverter(PathConverter):
        # Any non-empty key, '/' included (werkzeug's path converter refuses a leading '/').
        regex = ".+?"
        part_isolating = False  # spans '/' (werkzeug infers it from a '/' in the regex)

    app = Flask(__name__, static_folder=None)
    app.url_map.converters["key"] = KeyConverter
    app.url_map.merge_slashes = False  # "a//b" is a different key from "a/b"
    app.json.sort_keys = False

    def error(status: int, message: str):
        response = jsonify({"error": message, "status": status})
        response.status_code = status
        return response

    @app.before_request
    def check_host():
        if allowed_hosts is None:
            return None
        host = request.host.rsplit(":", 1)[0] if not request.host.endswith("]") else request.host
        host = host.strip("[]").lower()
        if host not in allowed_hosts:
            return error(403, f"host {request.host!r} refused: this server answers only to "
                              f"{', '.join(sorted(allowed_hosts))}")
        return None

    @app.errorhandler(404)
    def not_found(_):
        return error(404, f"no such page: {request.path}")

    @app.errorhandler(405)
    def bad_method(_):
        return error(405, f"method {request.method} not allowed")

    @app.get("/")
    def index():
        return send_from_directory(STATIC_DIR, "index.html", max_age=0)

    @app.get("/static/<name>")
    def static(name: str):
        return send_from_directory(STATIC_DIR, name, max_age=0)

    @app.get("/api/summary")
    def summary():
        return jsonify(browser.summary())

    @app.get("/api/rows")
    def rows():
        try:
            offset = int(request.args.get("offset", 0))
            limit = int(request.args.get("limit", 100))
            return jsonify(browser.rows(offset, limit, request.args.get("status", "all"), request.args.get("q", "")))
        except ValueError as exc:
            return error(400, str(exc))

    def image(key: str, kind: str):
        from flask import Response

        try:
            data = browser.png(key, kind)
        except NotFound as exc:
            return error(404, str(exc))
        except Exception as exc:  # a decode failure: the message goes to the tile
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return error(500, f"decoding {key!r} failed: {text}")
        return Response(data, mimetype="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/preview/<key:key>.png")
    def preview(key: str):
        return image(key, "preview")

    @app.get("/thumb/<key:key>.png")
    def thumb(key: str):
        return image(key, "thumb")

    @app.get("/image/<key:key>.png")
    def full(key: str):
        return image(key, "full")

    return app


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def make_server(browser: Browser, host: str = "127.0.0.1", port: int = DEFAULT_PORT):
    """A threaded werkzeug server for the page (port 0: a free one; see server.port)."""
    from werkzeug.serving import make_server as _make_server

    allowed = (LOOPBACK_NAMES | {host.lower().strip("[]")}) if is_loopback(host) else None
    return _make_server(host, port, make_app(browser, allowed), threaded=True)


def url_of(server) -> str:
    host = server.host
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{server.port}/"


def main(argv: list[str] | None = None) -> int:
    """`m2t browse ARCHIVE [--port P]`."""
    parser = argparse.ArgumentParser(
        prog="m2t browse",
        description="Browse an m2t archive in a web browser: its keys with status, bpp, PSNR and size, "
                    "a grid of tiles (a preview decoded from a prefix of each stream first, then the full "
                    "decode scaled to the tile), the full image on a click. "
                    "The server listens on 127.0.0.1 only (this machine) unless --host says otherwise; "
                    "the page has no authentication. Ctrl-C stops it.")
    parser.add_argument("archive", help="archive URL (a folder or s3://bucket/prefix)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"port to listen on (default {DEFAULT_PORT}; 0: any free port)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; another address "
                             "lets anyone who can reach it browse the archive, and is warned about)")
    parser.add_argument("--model", default=None, help="decode with this model (name, path or URL; default: "
                        "the installed model each bitstream names)")
    parser.add_argument("--storage-options", default=None, metavar="JSON",
                        help='fsspec options per protocol, e.g. \'{"s3": {"endpoint_url": "http://..."}}\'')
    parser.add_argument("--preview-steps", type=int, default=DEFAULT_PREVIEW_STEPS, metavar="K",
                        help=f"previews decode the first K coding steps, read as one prefix of the stream "
                             f"(default {DEFAULT_PREVIEW_STEPS}; K >= the model's steps: the full image)")
    parser.add_argument("--cache-mb", type=float, default=DEFAULT_CACHE_BYTES / (1 << 20),
                        help="memory for decoded PNGs, in MiB (default %(default)g)")
    parser.add_argument("--decode-workers", type=int, default=DEFAULT_DECODE_WORKERS, metavar="N",
                        help="threads decoding images (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        if args.preview_steps < 0:
            raise ValueError(f"--preview-steps must be >= 0, got {args.preview_steps}")
        if args.decode_workers < 1:
            raise ValueError(f"--decode-workers must be >= 1, got {args.decode_workers}")
        if not 0 <= args.port <= 65535:
            raise ValueError(f"--port must be 0..65535, got {args.port}")
        options = json.loads(args.storage_options) if args.storage_options else None
        browser = Browser(args.archive, args.model, options, args.preview_steps,
                          cache_bytes=int(args.cache_mb * (1 << 20)), decode_workers=args.decode_workers)
        try:
            server = make_server(browser, args.host, args.port)
        except OSError as exc:
            raise OSError(f"cannot listen on {args.host}:{args.port} ({exc.strerror or exc}): "
                          "choose another --port (0: any free one)") from None
    except Exception as exc:  # one clear line for users; M2T_DEBUG=1 shows the traceback
        if os.environ.get("M2T_DEBUG"):
            raise
        print(f"m2t browse: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
              file=sys.stderr)
        return EXIT_USAGE
    if not is_loopback(args.host):
        print(f"m2t browse: warning: listening on {args.host}, not loopback: anyone who can reach this "
              "machine can browse the archive (there is no authentication)", file=sys.stderr)
    if not os.environ.get("M2T_DEBUG"):  # no line per request (M2T_DEBUG=1 shows them)
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
    for warning in browser.warnings:
        print(f"m2t browse: warning: {warning}", file=sys.stderr)
    counts = ", ".join(f"{n} {s}" for s, n in browser.counts.items() if n)
    print(f"{browser.archive_url}: {len(browser.table)} rows ({counts or 'empty'})")
    print(f"browse it at {url_of(server)}  (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()  # werkzeug's: returns on Ctrl-C and closes the socket
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    print("m2t browse: stopped")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
