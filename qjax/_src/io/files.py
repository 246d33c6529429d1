"""Checkpoint directories on disk: one writer at a time, written beside, swapped in whole.

A save writes `<name>.qjax-new-*` beside `<name>` (same filesystem) while it holds the O_EXCL
lock file `<name>.qjax-lock`, lists every file's size in `_QJAX_FILES` (the mark of a complete
save), then swaps the directories with renameat2(RENAME_EXCHANGE), or with two renames where
that is missing: while `<name>` is absent, `displaced` names the complete sibling to read.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import shutil
import socket
import threading
import time
import uuid

from qjax._src.errors import CheckpointError

STEP_METADATA_FILE = "_CHECKPOINT_METADATA"  # orbax's, in every complete step directory
TMP_MARK = ".orbax-checkpoint-tmp"          # orbax's own temporary directories
NEW_MARK = ".qjax-new-"    # <name>.qjax-new-<ns>-<pid>: a save being written beside <name>
OLD_MARK = ".qjax-old-"    # the checkpoint a two-rename swap moved aside, until the new one is in place
TRASH_MARK = ".qjax-del-"  # a replaced checkpoint being deleted: never read
LOCK_SUFFIX = ".qjax-lock"
FILES = "_QJAX_FILES"      # {relative path: size} of every file, written last: marks a complete save
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
# orbax's checkpointers fail or hang when several threads of one process save at once.
WRITE_LOCK = threading.Lock()


def siblings(path: str, *marks: str) -> list[str]:
    """Directories `<name><mark>*` beside `path`, newest first (their names start with a time in ns)."""
    parent, name = os.path.split(path)
    try:
        found = [f for f in os.listdir(parent or ".") if any(f.startswith(name + m) for m in marks)]
    except FileNotFoundError:
        return []
    return [os.path.join(parent, f) for f in sorted(found, reverse=True)]


def complete(d: str) -> bool:
    return os.path.isfile(os.path.join(d, FILES)) or os.path.isfile(os.path.join(d, STEP_METADATA_FILE))


def displaced(path: str) -> str | None:
    """The checkpoint to read while a two-rename swap is interrupted (`path` missing, the old one
    moved aside): the complete new one, else the old one. None when no swap was interrupted."""
    old = [d for d in siblings(path, OLD_MARK) if complete(d)]
    if not old:
        return None
    new = [d for d in siblings(path, NEW_MARK) if os.path.isfile(os.path.join(d, FILES))]
    return (new + old)[0]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _age(f: str) -> float:
    try:
        return time.time() - os.path.getmtime(f)
    except FileNotFoundError:
        return 0.0


def _read_lock(lock: str) -> dict | None:
    try:
        with open(lock) as fh:
            return json.load(fh)
    except (ValueError, OSError):  # being written, or gone
        return None


@contextlib.contextmanager
def exclusive(path: str):
    """Holds the lock file `<path>.qjax-lock` (created with O_EXCL) while one writer replaces `path`.

    A lock whose process (same host) is gone is stale and taken over. Raises CheckpointError
    naming the path and the holder when another thread or process holds it.
    """
    lock = path + LOCK_SUFFIX
    me = {"pid": os.getpid(), "host": socket.gethostname(), "token": uuid.uuid4().hex}
    for _ in range(5):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(lock)
            if (holder is not None and holder.get("host") == me["host"] and not _alive(holder.get("pid", -1))
                    or holder is None and _age(lock) > 30):  # None: a writer killed before it wrote its pid
                _break_stale(lock, holder)
                continue
            who = ("this process (another thread, or a ResumeManager not closed yet)"
                   if holder and holder.get("pid") == me["pid"] else
                   f"process {holder.get('pid')} on {holder.get('host')}" if holder else "another writer")
            raise CheckpointError(f"checkpoint {path!r} is being written by {who} (lock file {lock!r}): wait for "
                                  "it to finish; if no such process runs, delete the lock file") from None
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(lock)
        return
    raise CheckpointError(f"could not take the lock file {lock!r} of {path!r}: other writers keep taking it")


def _break_stale(lock: str, holder: dict) -> None:
    """Removes a dead writer's lock; gives it back if a live writer took it meanwhile."""
    aside = f"{lock}.stale-{uuid.uuid4().hex}"
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return
    if _read_lock(aside) != holder:
        with contextlib.suppress(FileExistsError):
            os.link(aside, lock)
    os.remove(aside)


@functools.lru_cache(maxsize=None)
def _libc_renameat2():
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


def renameat2(src: str, dst: str, flags: int) -> bool:
    """Linux renameat2(2) (RENAME_EXCHANGE: swap two paths atomically); False where libc or the
    filesystem lacks it."""
    fn = _libc_renameat2()
    if fn is None:
        return False
    if fn(-100, os.fsencode(src), -100, os.fsencode(dst), flags) == 0:  # -100: AT_FDCWD
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), src, None, dst)


def fresh(path: str, mark: str) -> str:
    return f"{path}{mark}{time.time_ns()}-{os.getpid()}"


def _fsync_dir(d: str) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def finish(d: str) -> None:
    """Lists every file of the written checkpoint `d` with its size in _QJAX_FILES: from now on it is complete."""
    sizes = {}
    for root, _, files in os.walk(d):
        for f in files:
            sizes[os.path.relpath(os.path.join(root, f), d)] = os.path.getsize(os.path.join(root, f))
    with open(os.path.join(d, FILES), "w") as fh:
        json.dump(sizes, fh)
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(d)


def swap_in(new: str, path: str) -> None:
    """Moves the complete checkpoint `new` to `path`. At every instant `path`, or while it is
    missing `displaced(path)`, holds the old or the new checkpoint."""
    if not os.path.lexists(path):
        if not renameat2(new, path, _RENAME_NOREPLACE):
            os.rename(new, path)  # the lock keeps other qjax writers away
    elif renameat2(new, path, _RENAME_EXCHANGE):
        trash = fresh(path, TRASH_MARK)
        os.rename(new, trash)  # `new` now holds the old checkpoint
        shutil.rmtree(trash)
    else:
        old = fresh(path, OLD_MARK)
        os.rename(path, old)
        try:
            os.rename(new, path)  # killed before this: `path` is missing and restore reads `new`
        except BaseException:
            os.rename(old, path)
            raise
        trash = fresh(path, TRASH_MARK)
        os.rename(old, trash)
        shutil.rmtree(trash)
    _fsync_dir(os.path.dirname(path))


def tidy(path: str) -> None:
    """Finishes a swap a killed writer left half done and deletes its temporaries (lock held)."""
    if not os.path.lexists(path):
        moved = displaced(path)
        if moved is not None:
            os.rename(moved, path)
    for d in siblings(path, NEW_MARK, OLD_MARK, TRASH_MARK, TMP_MARK):
        shutil.rmtree(d, ignore_errors=True)
