"""Archives that ML pipelines read directly (docs/ml.md).

    from pipeline.ml import ArchiveDataset        # a PyTorch IterableDataset (imports torch)
    from pipeline.ml import read_archive          # a ray.data.Dataset (imports Ray)

Both decode on the worker with the archive's model; pipeline/ml/reader.py is what they share.
Exports to webdataset tar shards and Hugging Face Parquet: `m2t restore --format webdataset|parquet`
(pipeline/jobs/exports.py).
"""

from __future__ import annotations


def __getattr__(name: str):
    # Imported on use: the torch dataset need not load Ray, nor the Ray source a DataLoader.
    if name in ("ArchiveDataset", "collate_samples"):
        from pipeline.ml import torch_dataset

        return getattr(torch_dataset, name)
    if name == "read_archive":
        from pipeline.ml.ray_data import read_archive

        return read_archive
    raise AttributeError(f"module 'pipeline.ml' has no attribute {name!r}")


__all__ = ["ArchiveDataset", "collate_samples", "read_archive"]
