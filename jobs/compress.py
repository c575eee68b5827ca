#!/usr/bin/env python3
"""Compress an image corpus into an m2t archive (all logic lives in pipeline/jobs/compress.py).

    python jobs/compress.py INPUT [INPUT ...] OUTPUT [--config configs/pipeline/default.yaml]
                            [--set key=value ...] [--overwrite] [--no-ray]
    RAY_ADDRESS=... ray job submit --working-dir . -- python jobs/compress.py s3://in s3://out
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from pipeline.jobs.compress import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
