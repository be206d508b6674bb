"""Test helpers for hostile-input tests: a folder's exact state (to prove nothing was changed) and a
command's stderr checked to be one line."""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path


def tree_state(root: Path) -> dict[str, tuple]:
    """Every entry under `root` (itself included): (kind, mode, sha256 of a file's bytes / a link's target)."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            p = Path(dirpath) / name if name != "." else Path(dirpath)
            st = p.lstat()
            if stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                digest = os.readlink(p)
            else:
                digest = None
            state[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), digest)
    return state


def one_error_line(stderr: str, prog: str) -> str:
    """The single line `prog: error: ...` that stderr must consist of (no traceback, no usage block)."""
    lines = stderr.strip("\n").splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    assert "Traceback" not in stderr
    return lines[0]
