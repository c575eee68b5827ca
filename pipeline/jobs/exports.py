"""Where `m2t restore` puts the decoded images: one writer interface, three formats.

    m2t restore ARCHIVE OUT --format folder        OUT/<key>.png, one file per image (also png, bmp,
                                                   tiff, webp, ppm: a folder of that format)
    m2t restore ARCHIVE OUT --format webdataset    OUT/<shard>.tar: <shard>-<n>.png + <shard>-<n>.json
                                                   ({"key", source metadata}) per image; read by
                                                   webdataset.WebDataset
    m2t restore ARCHIVE OUT --format parquet       OUT/<shard>.parquet: key, image {bytes, path},
                                                   source metadata; Hugging Face `datasets` loads it
                                                   with its Parquet loader (the image column is an
                                                   Image feature)

The restore job (pipeline/jobs/verify.py, process_shard) decodes and checks every stream as
verify does, and hands each good image to its shard's `ShardExport`. Images are PNG (lossless:
the archive does not keep the original files' bytes). Any fsspec URL works; locally every
file is written under a temporary name and renamed, on object stores an object appears when
its upload completes.

Resume: the folder writer skips files already there. The shard writers write one file per
archive shard, then a marker `<shard>.<tar|parquet>.json` (the keys it holds and the issues of
its images), last; a rerun skips shards with a marker and reports their recorded issues again,
so an image that failed is never silently missing from a resumed export.
"""

from __future__ import annotations

import abc
import io
import json
import tarfile
from typing import Any, Mapping

import numpy as np

from pipeline.errors import UsageError
from pipeline.storage import archive as A

EXPORT_FORMATS = ("folder", "webdataset", "parquet")
# A folder of images in one of these formats (lossless only): Pillow's name, the extension.
IMAGE_FORMATS = {"png": ("PNG", ".png"), "bmp": ("BMP", ".bmp"), "tiff": ("TIFF", ".tiff"),
                 "webp": ("WEBP", ".webp"), "ppm": ("PPM", ".ppm")}
PARQUET_ROWS_PER_GROUP = 64  # images buffered before a row group is written: bounds memory


def export_settings(fmt: str, keys) -> tuple[str, str, str]:
    """(export kind, Pillow image format, extension) of restore's --format; UsageError for
    --keys with a shard format (a shard file is whole: a subset would be taken as done)."""
    if fmt in IMAGE_FORMATS:
        return ("folder", *IMAGE_FORMATS[fmt])
    if fmt not in EXPORT_FORMATS:
        raise UsageError(f"--format must be one of {', '.join(EXPORT_FORMATS + tuple(IMAGE_FORMATS))}, got {fmt!r}")
    if fmt != "folder" and keys is not None:
        raise UsageError(f"--keys restores single files: use it with --format folder, not {fmt} "
                         "(which writes whole shards)")
    return (fmt, *IMAGE_FORMATS["png"])


def png_of(rgb: np.ndarray, image_format: str = "PNG") -> bytes:
    from m2t_core.image_io import save_image

    buf = io.BytesIO()
    save_image(rgb, buf, format=image_format)
    return buf.getvalue()


class ShardExport(abc.ABC):
    """The decoded images of one archive shard on their way to the output.

    place(key) names where an image goes (None: refused), exists(place) says it is there
    already (resume), add() writes one, commit(out) finishes the shard; `done()` is the record
    of a shard exported by an earlier run (None if it must be done)."""

    def __init__(self, output: A.Archive, shard: str, image_format: str, ext: str):
        self.output, self.shard, self.image_format, self.ext = output, shard, image_format, ext

    def done(self) -> dict[str, Any] | None:
        return None

    @abc.abstractmethod
    def place(self, key: str) -> str | None:
        """Where `key` goes, relative to the output root; None if the key cannot be written."""

    def exists(self, place: str) -> bool:
        return False

    @abc.abstractmethod
    def add(self, key: str, place: str, rgb: np.ndarray, row: Mapping[str, Any]) -> None:
        """Write one decoded image (RGB uint8 (H, W, 3)) with its index row's metadata."""

    def commit(self, out: Mapping[str, Any]) -> None:
        """The shard is decoded (`out`: its restore result, files and issues)."""

    def abort(self) -> None:
        """The shard failed: drop what was written of it."""


class FolderExport(ShardExport):
    """OUTPUT/<key><ext>, one file per image; keys that could escape the root are refused."""

    def place(self, key: str) -> str | None:
        from pipeline.storage.index_checks import safe_relpath

        return safe_relpath(key, self.ext)

    def exists(self, place: str) -> bool:
        try:
            return self.output.fs.exists(self.output.path(place))
        except Exception:
            return False

    def add(self, key: str, place: str, rgb: np.ndarray, row: Mapping[str, Any]) -> None:
        self.output.write_bytes(self.output.path(place), png_of(rgb, self.image_format))


def sample_metadata(key: str, row: Mapping[str, Any]) -> dict[str, Any]:
    """The key and the index's source metadata of an image (JSON-safe: inf as "inf")."""
    from pipeline.ml.reader import METADATA_COLUMNS

    meta = {"key": key, **{name: row.get(name) for name in METADATA_COLUMNS}}
    return json.loads(A.dumps(meta))


class _ShardFile(ShardExport):
    """One output file per archive shard (`<shard><suffix>`), streamed to a temporary name and
    moved into place by commit(), then its marker `<shard><suffix>.json`."""

    suffix = ""

    def __init__(self, output: A.Archive, shard: str, image_format: str, ext: str):
        super().__init__(output, shard, image_format, ext)
        self.name = f"{A.check_shard_name(shard)}{self.suffix}"
        self.path = output.path(self.name)
        self.marker = output.path(self.name + ".json")
        self.count = 0
        self.file = None

    def done(self) -> dict[str, Any] | None:
        try:
            record = json.loads(self.output.fs.cat_file(self.marker))
        except (FileNotFoundError, ValueError, UnicodeDecodeError):
            return None  # no marker (or a damaged one): the shard is written again
        ok = isinstance(record, dict) and isinstance(record.get("files"), dict) and isinstance(record.get("issues"), list)
        return record if ok and self.output.fs.exists(self.path) else None

    def _open(self):
        if self.file is None:
            self.output.fs.makedirs(self.output.root, exist_ok=True)
            self.tmp = self.output._tmp(self.path)
            self.file = self.output.fs.open(self.tmp, "wb")
            self._start()
        return self.file

    def _start(self) -> None:
        pass

    def _finish(self) -> None:
        pass

    def commit(self, out: Mapping[str, Any]) -> None:
        self._open()  # a shard with no image still gets its (empty) file: it was exported
        self._finish()
        self.file.close()
        self.output._commit(self.tmp, self.path)
        # Images' issues only: a shard's own (its blob, its index) are found again by every run.
        issues = [i for i in out["issues"] if i.get("key") is not None]
        failed = {i["key"] for i in issues}
        files = {k: v for k, v in out["files"].items() if k not in failed}  # what the file holds
        self.output.write_json(self.marker, {"shard": self.shard, "file": self.name, "images": len(files),
                                             "files": files, "issues": issues})

    def abort(self) -> None:
        if self.file is not None:
            A.discard_partial_file(self.output.fs, self.file, self.tmp, self.path)


class WebDatasetExport(_ShardFile):
    """OUTPUT/<shard>.tar in webdataset's layout: per image `<shard>-<n>.png` and
    `<shard>-<n>.json` (the key and its metadata), n its place among the shard's ok rows."""

    suffix = ".tar"

    def place(self, key: str) -> str:
        self.count += 1
        return f"{self.name}#{self.shard}-{self.count - 1:06d}"

    def _start(self) -> None:
        self.tar = tarfile.open(fileobj=self.file, mode="w|", format=tarfile.PAX_FORMAT)

    def add(self, key: str, place: str, rgb: np.ndarray, row: Mapping[str, Any]) -> None:
        self._open()
        stem = place.split("#", 1)[1]
        for member, data in ((f"{stem}.png", png_of(rgb)),
                             (f"{stem}.json", json.dumps(sample_metadata(key, row)).encode())):
            info = tarfile.TarInfo(member)
            info.size, info.mode = len(data), 0o644
            self.tar.addfile(info, io.BytesIO(data))

    def _finish(self) -> None:
        self.tar.close()


def parquet_schema():
    """Columns of a Parquet export, with the Hugging Face features that make `image` an Image."""
    import pyarrow as pa

    features = {"key": {"dtype": "string", "_type": "Value"}, "image": {"_type": "Image"},
                "source": {"dtype": "string", "_type": "Value"}, "shard": {"dtype": "string", "_type": "Value"},
                "height": {"dtype": "int32", "_type": "Value"}, "width": {"dtype": "int32", "_type": "Value"},
                "source_bytes": {"dtype": "int64", "_type": "Value"}, "bpp": {"dtype": "float64", "_type": "Value"},
                "psnr": {"dtype": "float64", "_type": "Value"}}
    schema = pa.schema([("key", pa.string()), ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("source", pa.string()), ("shard", pa.string()), ("height", pa.int32()),
                        ("width", pa.int32()), ("source_bytes", pa.int64()), ("bpp", pa.float64()),
                        ("psnr", pa.float64())])
    return schema.with_metadata({"huggingface": json.dumps({"info": {"features": features}})})


class ParquetExport(_ShardFile):
    """OUTPUT/<shard>.parquet: one row per image (parquet_schema), written in row groups of
    PARQUET_ROWS_PER_GROUP images."""

    suffix = ".parquet"

    def place(self, key: str) -> str:
        self.count += 1
        return f"{self.name}#row={self.count - 1}"

    def _start(self) -> None:
        import pyarrow.parquet as pq

        self.schema = parquet_schema()
        self.writer = pq.ParquetWriter(self.file, self.schema)
        self.rows: list[dict[str, Any]] = []

    def add(self, key: str, place: str, rgb: np.ndarray, row: Mapping[str, Any]) -> None:
        self._open()
        self.rows.append({"key": key, "image": {"bytes": png_of(rgb), "path": key + ".png"},
                          **{n: row.get(n) for n in ("source", "shard", "height", "width", "source_bytes", "bpp",
                                                     "psnr")}})
        if len(self.rows) >= PARQUET_ROWS_PER_GROUP:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self.rows:
            self.writer.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
            self.rows = []

    def _finish(self) -> None:
        self._flush()
        self.writer.close()


WRITERS = {"folder": FolderExport, "webdataset": WebDatasetExport, "parquet": ParquetExport}


def open_export(kind: str, output_url: str, storage_options, shard: str, image_format: str, ext: str) -> ShardExport:
    """The writer of one archive shard's images for restore's export `kind`."""
    return WRITERS[kind](A.Archive(output_url, storage_options), shard, image_format, ext)


def resume_shard(export: ShardExport, out: dict[str, Any]) -> bool:
    """Whether `export`'s shard was written by an earlier run; if so `out` (the shard's restore
    result) takes its record: files skipped, its issues reported again."""
    record = export.done()
    if record is None:
        return False
    out["files"].update(record["files"])
    out["skipped"] += len(record["files"])
    issues = [i for i in record["issues"] if isinstance(i, dict) and isinstance(i.get("key"), str)]
    out["images"] += len(record["files"]) + len({i["key"] for i in issues})
    out["issues"] += [{**i, "message": f"{i.get('message')} (recorded when this shard was exported)"} for i in issues]
    return True
