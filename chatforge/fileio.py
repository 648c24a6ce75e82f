"""File helpers every stage shares: atomic writes, and the one JSONL reader.

Atomic writes are for single files: manifests, indexes, tokenizers, summaries, reports.

(Multi-file checkpoints are folders renamed into place, in checkpoint.py; metrics.jsonl is
appended to, and trimmed on resume through a temp file + rename, in train/metrics.py.)

Write to a temp file in the same folder, flush it to disk, then rename it over the
target. A rename within a folder is atomic, so a kill at any moment leaves either the
old file or the new one, never a torn mix.
"""

from __future__ import annotations

import bz2
import gzip
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from chatforge.errors import ChatforgeError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a saved file should read like any other
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def open_text(path: str | os.PathLike):
    """Open a UTF-8 text file for reading, transparently decompressing .gz / .bz2."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    if suffix == ".bz2":
        return bz2.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read_jsonl(path: str | os.PathLike, *, objects_only: bool = True) -> Iterator[tuple[int, Any]]:
    """(line number, value) for each non-blank line of a .jsonl(.gz/.bz2) file.

    Every problem is a one-line ChatforgeError naming the file and line: a missing file, bad
    JSON, a value that is not a JSON object (unless objects_only=False), unreadable bytes."""
    p = Path(path)
    if not p.is_file():
        raise ChatforgeError(f"no file at {p}: check the path")
    try:
        with open_text(p) as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ChatforgeError(
                        f"{p} line {n}: malformed JSON ({e.msg}); fix or remove the line"
                    ) from None
                if objects_only and not isinstance(obj, dict):
                    raise ChatforgeError(f"{p} line {n}: expected a JSON object, got {type(obj).__name__}")
                yield n, obj
    except UnicodeDecodeError:
        raise ChatforgeError(
            f"{p} is not UTF-8 text; convert it first, e.g. iconv -f latin1 -t utf-8"
        ) from None
    except (OSError, EOFError) as e:  # includes a corrupt or truncated .gz
        raise ChatforgeError(f"{p} could not be read ({e}); is it the right file?") from None


def save_figure(fig, png: Path) -> Path:
    """Write a matplotlib figure to `png` atomically (temp file + rename) and close it."""
    import matplotlib.pyplot as plt  # noqa: PLC0415  (matplotlib stays off the import path of every command)

    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png)
    return png
