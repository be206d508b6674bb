#!/usr/bin/env python
"""Train without installing the package: same as `flashsd3-train`.

    python scripts/train.py prepare --demo --data images/ --resolution 64 --out cache/
    python scripts/train.py flow --cache cache/ --out runs/demo --steps 100
    torchrun --nproc_per_node 2 scripts/train.py flow --cache cache/ --out runs/demo2 --steps 100

All options: flashsd3/training/cli.py (or --help).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for a plain checkout

from flashsd3.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
