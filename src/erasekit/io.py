"""Safe file output: atomic writes and directories that never clobber what the user already has."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from erasekit.errors import ErasekitError


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, _usual_mode(0o666))  # mkstemp makes 0600; the result should look like any new file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def dumps_json(obj: Any) -> str:
    """The project's JSON style for artifacts: indent 2, sorted keys, trailing newline."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, dumps_json(obj))


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON file's content; a missing or broken file is a one-line :class:`ErasekitError`."""
    path = Path(path)
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ErasekitError(f"cannot read {path}: {e}") from None


def normal(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists, keys sorted)."""
    return json.loads(json.dumps(obj, sort_keys=True))


@contextlib.contextmanager
def locked(directory: str | Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``directory`` while the block runs, for a read-modify-write that other
    processes (the shards of one bench) may do at the same time.

    ``flock`` on the directory's own descriptor, so no lock file is left behind. It is not re-entrant: a nested
    ``locked`` on the same directory in the same process waits forever. Where ``fcntl`` does not exist (Windows),
    or the file system refuses the lock (some network file systems), the block runs unlocked, with a warning.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # pragma: no cover - depends on the file system
            warnings.warn(f"cannot lock {directory} ({e}); writing without the lock", stacklevel=3)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def check_output_dir(path: str | Path, overwrite: bool = False) -> Path:
    """Refuse an existing, non-empty output directory unless ``overwrite`` is set."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ErasekitError(f"output {path} exists and is not a directory")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise ErasekitError(f"output {path} already exists; pass --overwrite to replace it")
    return path


@contextlib.contextmanager
def output_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh staging directory; on success it replaces ``path`` in one rename.

    Nothing is written at ``path`` if the body raises, and an existing ``path`` is refused unless
    ``overwrite`` is set (then it is replaced only after the new content is complete).
    """
    path = check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial"))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _usual_modes(staging)
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.replace(path, old)
    os.replace(staging, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _usual_mode(full: int) -> int:
    """``full`` less the process umask: the mode ``open()`` / ``mkdir()`` would give a new file or folder."""
    mask = os.umask(0)
    os.umask(mask)
    return full & ~mask


def _usual_modes(root: Path) -> None:
    """Give ``root`` and everything in it the modes of freshly made files and folders.

    Staging folders come from ``mkdtemp`` (0700) and some writers (safetensors) make 0600 files: without this a
    patch or a run would be unreadable to the user's group even where their umask allows it.
    """
    file_mode, dir_mode = _usual_mode(0o666), _usual_mode(0o777)
    os.chmod(root, dir_mode)
    for item in root.rglob("*"):
        if item.is_symlink():
            continue
        if item.is_dir():
            os.chmod(item, dir_mode)
        elif not item.stat().st_mode & stat.S_IXUSR:
            os.chmod(item, file_mode)
