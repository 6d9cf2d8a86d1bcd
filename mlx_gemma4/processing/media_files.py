"""The checks every media file passes before it is decoded: it exists, is readable, is not empty.

A file the user may not read is said to be unreadable, naming the cause, not "corrupt"."""

from __future__ import annotations

from pathlib import Path

from ..errors import Gemma4Error
from ..files import describe


def checked_media_file(source: str | Path, kind: str, error: type[Gemma4Error]) -> Path:
    """`source` as a path to a non-empty file this process can read; otherwise `error` with one
    line naming the path and the cause. `kind` names the medium ("image", "audio", "video")."""
    path = Path(source).expanduser()
    try:
        if not path.is_file():
            raise error(f"{path}: no such {kind} file")
        empty = path.stat().st_size == 0
        with path.open("rb"):  # the permission check the decoder would fail obscurely
            pass
    except OSError as e:  # e.g. a folder on the way that may not be searched, a private file
        raise error(f"cannot read {path}: {describe(e)}") from e
    if empty:
        raise error(f"{path}: the file is empty")
    return path
