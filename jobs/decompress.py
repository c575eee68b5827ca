#!/usr/bin/env python3
"""Verify or restore an m2t archive (all logic lives in pipeline/jobs/verify.py).

    python jobs/decompress.py verify ARCHIVE [--shards ...] [--against-source] [--no-ray]
    python jobs/decompress.py restore ARCHIVE OUTPUT [--format png] [--keys ...]
    RAY_ADDRESS=... ray job submit --working-dir . -- python jobs/decompress.py verify s3://bucket/archive
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from pipeline.jobs.verify import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
