"""Why a store cannot be opened, said in one line an operator can act on.

`Store.open` runs `prepare_location` before SQLite sees the path and turns SQLite's own errors into
`StoreUnavailable` with `unusable`: the path, the problem, and what to do (restore a backup,
`sqlite3 .recover`, permissions, mount the volume). No traceback names less.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import structlog

log = structlog.get_logger("listenerd.store")


class StoreUnavailable(RuntimeError):
    """The store cannot be used as it is; the message is one line: the path, the problem, what to do."""

    def __init__(self, path: str | Path, problem: str, action: str):
        super().__init__(f"store {path}: {problem}; {action}")
        self.path = str(path)


def prepare_location(path: Path, create_directory: bool) -> str | None:
    """Refuse a store path that cannot work, before SQLite makes it a vague error; returns why a missing
    directory was created (None when it existed).

    A missing directory is created only when the config says so or it is the unit's own
    StateDirectory: anywhere else it may be a volume that failed to mount, and a new empty store
    there would hide the outbox, dead letters and checkpoints on it without a word.
    """
    directory = path.parent
    try:
        if not directory.exists():
            reason = ("[store] create-directory" if create_directory
                      else "systemd StateDirectory" if _is_state_directory(directory) else None)
            if reason is None:
                raise StoreUnavailable(path, f"directory {directory} does not exist",
                                       "mount the volume that holds the store or create the directory "
                                       "(set [store] create-directory = true to let listenerd create it)")
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            return reason
        if not directory.is_dir():
            raise StoreUnavailable(path, f"{directory} is not a directory",
                                   "point [store] path at a file in a directory")
        if path.is_dir():
            raise StoreUnavailable(path, "is a directory, not a database file",
                                   f"point [store] path at a file, e.g. {path / 'listenerd.db'}")
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            raise StoreUnavailable(path, "is on a read-only file system",
                                   "mount the volume read-write (listenerd writes the store and its -wal and -shm "
                                   "files)")
        if path.exists() and not os.access(path, os.R_OK | os.W_OK):
            raise StoreUnavailable(path, "is not writable (permissions, owner or the immutable attribute)",
                                   "make it readable and writable by the user listenerd runs as")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise StoreUnavailable(path, f"directory {directory} is not writable",
                                   "make it writable by the user listenerd runs as (SQLite creates the store's "
                                   "-wal and -shm files beside it)")
    except OSError as exc:
        raise StoreUnavailable(path, f"cannot be reached ({exc.strerror or exc})",
                               "check the permissions of its directories and that its volume is mounted") from exc
    return None


def _is_state_directory(directory: Path) -> bool:
    """Whether `directory` is one systemd set up for this unit (StateDirectory= sets STATE_DIRECTORY)."""
    target = directory.resolve()
    return any(Path(p).resolve() == target for p in os.environ.get("STATE_DIRECTORY", "").split(":") if p)


def unusable(path: str, exc: sqlite3.Error) -> StoreUnavailable:
    """SQLite's error at open, as the one line an operator can act on."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name == "SQLITE_NOTADB":
        return StoreUnavailable(path, "is not a SQLite database", "restore the store from a backup, or point "
                                      "[store] path at the right file (move this one aside to start an empty store)")
    if name.startswith("SQLITE_CORRUPT"):
        return StoreUnavailable(path, f"is damaged ({exc})", salvage(path))
    if name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_AUTH")):
        return StoreUnavailable(path, f"cannot be opened for writing ({exc})",
                                "check that it and its directory are writable by this user and its volume is "
                                "mounted read-write")
    if name.startswith("SQLITE_FULL"):
        return StoreUnavailable(path, "the disk is full", "free space on its volume")
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return StoreUnavailable(path, f"is locked ({exc})", "stop the other process that holds it (another listenerd?)")
    return StoreUnavailable(path, f"cannot be opened ({name or type(exc).__name__}: {exc})",
                            "check the file and its disk")


def salvage(path: str) -> str:
    return (f"restore it from a backup, or salvage what it holds with `sqlite3 {path} .recover | sqlite3 "
            f"{path}.recovered` and point [store] path at that")


def private_file(path: Path, narrow: bool = False) -> None:
    """The store file readable by its owner only: created 0600, or (`narrow`, once it is known to be a good
    store) an existing one narrowed to it. It holds checkpoints, events and sealed credentials; SQLite
    gives its -wal and -shm files the same mode."""
    if not narrow and path.exists():
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return  # SQLite will say why, in its own words
    try:
        mode = os.fstat(fd).st_mode & 0o777
        if mode & 0o077:
            os.fchmod(fd, 0o600)
            log.warning("store file was readable by others; narrowed to 0600", path=str(path), was=oct(mode))
    finally:
        os.close(fd)
