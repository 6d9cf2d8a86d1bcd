"""Writing files so that nothing is ever half-written, and one clear line when the file system
says no. Every file and checkpoint folder the package or the CLI writes goes through here."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import FileAccessError

_CAUSES = {
    errno.ENOENT: "no such file or folder",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on the device",
    errno.EISDIR: "is a folder",
    errno.ENOTDIR: "a part of the path is not a folder",
}


def describe(error: OSError) -> str:
    """The cause of an OS error in a few words."""
    return _CAUSES.get(error.errno, error.strerror or type(error).__name__)


def access_error(path: str | Path, action: str, error: OSError) -> FileAccessError:
    """One line naming the path, what was being done and why it failed."""
    return FileAccessError(f"cannot {action} {path}: {describe(error)}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def require_writable_target(path: str | Path) -> Path:
    """Check, before any work, that `path` can be created or replaced: its folder exists, is a
    folder and is writable, and `path` itself is not a folder. Raises FileAccessError."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.exists():
        raise FileAccessError(f"cannot write {path}: the folder {folder} does not exist")
    if not folder.is_dir():
        raise FileAccessError(f"cannot write {path}: {folder} is not a folder")
    if path.is_dir():
        raise FileAccessError(f"cannot write {path}: it is a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise FileAccessError(f"cannot write {path}: permission denied in {folder}")
    return path


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without error, the temporary
    file gets the permissions the umask gives new files and replaces `path` in one rename.
    On error (Ctrl-C included) it is deleted and `path` is left as it was."""
    path = require_writable_target(path)
    try:
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise access_error(path, "write", error) from error
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        temporary.chmod(0o666 & ~_umask())  # mkstemp makes it private; a saved file should not be
        os.replace(temporary, path)
    except OSError as error:
        raise access_error(path, "write", error) from error
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomically(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` through `atomic_file`."""
    with atomic_file(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder beside `path`; when the block ends without error it replaces
    `path` (an existing folder is swapped out and removed only after the rename). On error,
    Ctrl-C or SIGTERM included when the caller turns it into an exception, the staging folder
    is removed and `path` is left as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(
            tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        )
    except OSError as error:
        raise access_error(path, "write", error) from error
    old = None
    try:
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result should not be
        yield staging
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(staging, path)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None and not path.exists():
            os.replace(old / path.name, path)  # put the previous folder back
        if isinstance(error, OSError) and not isinstance(error, FileAccessError):
            raise access_error(path, "write", error) from error
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
