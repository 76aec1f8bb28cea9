"""Writes that a crash never tears: fill a temporary sibling, fsync it, then take the target's place in
one rename. Every file and directory loramix writes (run-dir files, checkpoints, the adapter, a merged
model, the token cache, reports) goes through `replacing`."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from loramix.errors import LoramixError


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary sibling of `path` (same suffix) for the caller to create as a file or a directory.

    On a clean exit it is fsynced and renamed onto `path` (an existing directory is removed first);
    on an error it is removed and `path` is left as it was. A process killed midway leaves only the
    hidden `.NAME.PID.tmp*` sibling, which `stale_siblings` finds.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    _remove(tmp)
    try:
        yield tmp
        for f in [tmp, *tmp.rglob("*")] if tmp.is_dir() else [tmp]:
            _fsync(f)
        if path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    with contextlib.suppress(OSError):  # the rename itself reaches the disk with its directory
        _fsync(path.parent)


def stale_siblings(folder: Path) -> list[Path]:
    """Temporaries that a killed `replacing` left in `folder`."""
    return sorted(Path(folder).glob(".*.tmp*"))


def remove_orphans(path: Path) -> None:
    """Remove the temporaries of `path` that a killed process left (its PID no longer runs); a live
    process's, still being written, stay."""
    for tmp in Path(path).parent.glob(f".{Path(path).stem}.*.tmp*"):
        pid = tmp.name[len(Path(path).stem) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            _remove(tmp)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_atomic(path: Path, data: str | bytes) -> None:
    with replacing(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: Path, fix: str = "restore it from a copy, or rerun the command that wrote it"):
    """A JSON file loramix wrote.

    Raises:
        LoramixError: it does not parse (truncated, overwritten): naming the file and `fix`.
    """
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        why = f"not valid JSON at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else "not UTF-8 text"
        raise LoramixError(f"{path} is damaged ({why}); {fix}") from None


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
