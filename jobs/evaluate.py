#!/usr/bin/env python3
"""Rate-distortion evaluation of our models and classic codecs (all logic lives in pipeline/evaluation/evaluate.py).

    python jobs/evaluate.py --data URL [URL ...] [--models all] [--baselines jpeg,webp,avif,jpeg2000,jxl]
                            [--anchor jpeg] [--config configs/pipeline/evaluate.yaml] [--set key=value ...] OUTPUT
    RAY_ADDRESS=... ray job submit --working-dir . -- python jobs/evaluate.py --data s3://in s3://out
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from pipeline.evaluation.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="python jobs/evaluate.py"))
