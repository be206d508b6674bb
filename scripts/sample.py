#!/usr/bin/env python
"""Sample images from the command line without installing the package: same as `flashsd3-sample`.

    python scripts/sample.py --prompt "a raccoon reading a book" --seed 0
    python scripts/sample.py --demo            # offline toy model, seconds on CPU

All options: flashsd3/cli.py (or --help).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for a plain checkout

from flashsd3.cli import main  # noqa: E402  (imports no torch: main sets MKL_CBWR first, see cli.reproducible_mkl)

if __name__ == "__main__":
    sys.exit(main())
