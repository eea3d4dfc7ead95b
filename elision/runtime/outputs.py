"""Write output directories and files so that a failure never destroys what was there before.

    with atomic_directory(out, marker="manifest.json") as tmp:   # write everything into tmp
        ...
    # success: `out` is now exactly what was written into tmp; any failure or Ctrl-C: `out` is as it was

The new output is built in a hidden temporary sibling of the target (same file system, so the final step is a
rename) and put in place only when the writer finished. An existing directory is replaced only when it is empty or
a previous output of the same kind (it holds `marker`): a directory with other files in it (`-o .`, `-o ~`) is
refused, never deleted. `check_output_dir` / `check_output_file` run the same checks up front, so a command can
refuse a bad `-o` before spending minutes on tracing.

Torch-free (standard library only), so the lowering, the applications and the CLI share it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from elision.errors import OutputPathError

__all__ = ["atomic_directory", "atomic_file", "check_output_dir", "check_output_file"]


def _blocking_ancestor(path: Path) -> Path | None:
    """The nearest existing ancestor of `path` when it is not a directory (so nothing can be created below it)."""
    for parent in path.absolute().parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def _holds_marker(directory: Path, marker: str) -> bool:
    return any(directory.glob(marker))


def check_output_dir(path: str | os.PathLike, what: str = "output directory", *, marker: str | None = None) -> Path:
    """Raise OutputPathError when `path` cannot become an output directory; returns it as a Path.

    marker: a file name (or glob) that a previous output of this kind holds; a non-empty existing directory without
    it is refused, so that replacing the output never deletes files elision did not write.
    """
    path = Path(path)
    blocker = _blocking_ancestor(path)
    if blocker is not None:
        raise OutputPathError(f"cannot create the {what} {path}: {blocker} is a file, not a directory")
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"the {what} {path} is an existing file; give a directory path (it is created if missing)")
    if path.is_dir():
        real = path.resolve()
        if real == Path.cwd().resolve() or real in Path.cwd().resolve().parents:
            raise OutputPathError(f"the {what} {path} is the current directory (or holds it); give a new or empty "
                                  f"directory for the output")
        if marker is not None and any(real.iterdir()) and not _holds_marker(real, marker):
            names = sorted(p.name for p in real.iterdir())
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            raise OutputPathError(f"the {what} {path} already holds files that are not a previous elision output "
                                  f"({shown}); give a new or empty directory (elision replaces its output as a whole)")
    return path


def check_output_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """Raise OutputPathError when `path` cannot be written as a file; returns it as a Path."""
    path = Path(path)
    blocker = _blocking_ancestor(path)
    if blocker is not None:
        raise OutputPathError(f"cannot create the {what} {path}: {blocker} is a file, not a directory")
    if path.is_dir():
        raise OutputPathError(f"the {what} {path} is a directory; give a file name")
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _discard(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _swap_into_place(new: Path, target: Path) -> None:
    """Rename `new` to `target`; an existing `target` is moved aside first and restored if the rename fails."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        if target.exists():
            os.rename(target, old)
        os.rename(new, target)
    except BaseException:
        if old.exists() and not target.exists():
            os.rename(old, target)
        raise
    if old.exists():
        _discard(old)


def _resolved_target(path: Path) -> Path:
    # a symlinked output directory is written where it points (the rename must stay on that file system)
    return path.resolve() if path.is_symlink() else path


@contextmanager
def atomic_directory(target: str | os.PathLike, *, marker: str | None = None,
                     what: str = "output directory") -> Iterator[Path]:
    """Yield an empty temporary directory beside `target`; on success it becomes `target` (replacing a previous
    output), on any failure, KeyboardInterrupt included, it is removed and `target` is left untouched."""
    target = check_output_dir(target, what, marker=marker)
    real = _resolved_target(target)
    real.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{real.name}.tmp-", dir=real.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the output gets the usual permissions
        _swap_into_place(tmp, real)
    finally:
        if tmp.exists():
            _discard(tmp)


@contextmanager
def atomic_file(target: str | os.PathLike, *, what: str = "output file") -> Iterator[Path]:
    """Yield a temporary file path beside `target` with the same suffix (writers that pick a format from the suffix
    still work); on success it replaces `target`, on any failure it is removed and `target` is left untouched."""
    target = _resolved_target(check_output_file(target, what))
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.stem}.tmp-", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if not tmp.is_file():
            raise OutputPathError(f"nothing was written to {target}")
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
