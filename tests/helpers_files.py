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


def bomb_png(path: Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A 70-byte PNG whose header claims width x height pixels (10^10 by default): a decompression bomb.
    Its one IDAT chunk is a valid zlib stream of a single row, so only a decoder that trusts the header
    allocates the full image."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path
