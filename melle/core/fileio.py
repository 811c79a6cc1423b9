"""Writing outputs safely: atomically (a reader never sees a half-written file), with the
permissions the user's umask asks for, and never over something the program did not make.

The one rule for every writer: an output file that exists is replaced only with the user's
``--overwrite``; an output directory replaces only an empty folder or one of ours (every
entry written by us, recognised through its manifest or config), anything else only with
``--force``; and an output never replaces its own input.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from melle.core.cli import OutputError


def current_umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publishable(path: Path, mode: int) -> None:
    """mkstemp/mkdtemp create 0600/0700; give the output the mode a plain open()/mkdir() would."""
    os.chmod(path, mode & ~current_umask())


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _publishable(Path(tmp), 0o666)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``path`` as a whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        _publishable(tmp, 0o777)
        if path.exists():
            # Swap via a side name so a failure never leaves neither directory.
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / "dir")
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _writable_parent(path: Path, option: str) -> None:
    """Refuse ``path`` when its nearest existing ancestor is a file or not writable."""
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot write {option} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {option} {path}: no permission to write in {parent}; choose another path")


def check_output_file(path: str | Path, overwrite: bool = False, option: str = "--out") -> Path:
    """``path`` if a file may be written there: not a directory, not an existing file unless
    ``overwrite``, in a writable place. Call before the work that produces the file."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{option} {path} is a directory; give a file path such as {path / 'out.wav'}")
    if path.exists() and not overwrite:
        raise OutputError(f"{option} {path} exists; pass --overwrite to replace it, or choose another path")
    _writable_parent(path, option)
    return path


def check_output_dir(path: str | Path, what: str, owned_entries: Callable[[Path], set[str] | None] | None,
                     force: bool = False, inputs: Iterable[str | Path] = (), option: str = "--out") -> Path:
    """``path`` if ``what`` (e.g. "an engine directory") may be written there as a whole.

    ``owned_entries(dir)`` names the entries of an existing directory that we wrote (from its
    manifest or config), or returns None when it is not one of ours; ``owned_entries=None``
    allows only a new or empty folder. ``inputs`` may never be replaced, not even with ``force``.
    """
    path = Path(path)
    target = path.resolve()
    for source in inputs:
        source = Path(source).resolve()
        if target == source or target in source.parents:
            raise OutputError(f"{option} {path} would replace the input {source}; choose another directory")
    if path.exists() and not path.is_dir():
        raise OutputError(f"{option} {path} is a file, not a folder for {what}; choose another path")
    if path.is_dir() and any(path.iterdir()) and not force:
        if owned_entries is None:
            raise OutputError(f"{option} {path} is not empty, and {what} goes only into a new or empty folder; "
                              "choose another, or pass --force to replace it and everything in it")
        ours = owned_entries(path)
        if ours is None:
            raise OutputError(f"{option} {path} is a non-empty folder that is not {what}; choose a new "
                              "or empty one, or pass --force to replace it and everything in it")
        foreign = sorted(set(os.listdir(path)) - ours)
        if foreign:
            raise OutputError(f"{option} {path} holds files melle-rt did not write ({', '.join(foreign[:5])}); "
                              "move them away, or pass --force to replace the folder and everything in it")
    _writable_parent(path, option)
    return path
