#!/usr/bin/env python3
"""Train an M2T / MT codec (all logic lives in pipeline/training/trainer.py).

    python jobs/train.py --config configs/train/m2t-small.yaml [--set key=value ...] [--resume] [--no-ray]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from pipeline.training.trainer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
