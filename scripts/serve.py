#!/usr/bin/env python
"""Serve the pipeline over HTTP without installing the package: same as `flashsd3-serve`.

    python scripts/serve.py --demo            # offline toy model on http://127.0.0.1:7860/

All options: flashsd3/serve/cli.py (or --help). Needs the `serve` extra (FastAPI + uvicorn).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for a plain checkout

from flashsd3.serve.cli import main  # noqa: E402  (imports no torch: main sets MKL_CBWR first)

if __name__ == "__main__":
    sys.exit(main())
