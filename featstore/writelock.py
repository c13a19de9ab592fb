"""One writer per store: a lock file ``<store>.lock`` beside the store and its ``.partial`` run.

The lock is an ``fcntl.flock`` on that file. The kernel drops it when its holder dies (``kill -9``,
out-of-memory kill), so the lock of a dead process on this machine is free at once and the next
run simply takes it over: no pid guessing, no race. The file holds the holder's pid, host and
start time, so a refused second writer can say who holds it.

Two further cases are handled:

* The holder deletes the lock file when it releases the lock. A process that opened the old file
  just before that and locks it afterwards would hold a lock nobody else sees, so after locking
  we check that the path still names the file we locked, and retry otherwise.
* On a shared file system without working locks (NFS mounted ``nolock``), ``flock`` only excludes
  processes of one machine. The holder therefore refreshes the file's modification time at every
  committed batch (:meth:`WriterLock.heartbeat`); a lock file written by *another* host that was
  refreshed less than :data:`FOREIGN_STALE_SECONDS` ago is refused even when ``flock`` succeeds,
  and the holder re-reads the file at every heartbeat and stops when it names someone else.
  Where ``flock`` is not supported at all, the lock falls back to exclusive creation
  (``O_CREAT | O_EXCL``) with the same rules for stale files.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

#: a lock file of another host not refreshed for this long is considered abandoned
FOREIGN_STALE_SECONDS = 15 * 60


class LockBusy(RuntimeError):
    """Another process is writing this store."""


class LockLost(RuntimeError):
    """The lock file now names another writer (shared file system without working locks)."""


def lock_path(store: str | os.PathLike) -> Path:
    store = Path(store)
    return store.with_name(store.name + ".lock")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_info(path: Path) -> dict:
    try:
        info = json.loads(path.read_text() or "{}")
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError, UnicodeDecodeError):
        return {}


def _describe(info: dict) -> str:
    if not info:
        return "another process"
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started {info.get('started', '?')}"


class WriterLock:
    """``with WriterLock(store_path): ...`` — exclusive right to write ``store_path``.

    Raises :class:`LockBusy` naming the holder when another process holds it. ``note`` says
    when a stale lock was taken over (``None`` otherwise).
    """

    def __init__(self, store: str | os.PathLike, command: str = "featstore"):
        self.store = Path(store)
        self.path = lock_path(self.store)
        self.command = command
        self.fd: int | None = None
        self.note: str | None = None
        self.info: dict = {}
        self._flock = True

    # -- acquiring ----------------------------------------------------------------------------
    def acquire(self) -> "WriterLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(50):
            existed = self.path.exists()
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise LockBusy(self._busy(_read_info(self.path))) from None
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    if not existed:  # the empty file this attempt created is nobody's lock
                        self.path.unlink(missing_ok=True)
                    self._flock = False
                    return self._acquire_exclusive()
                raise
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed the file between our open and our lock
                os.close(fd)
                continue
            try:
                self._claim(fd)
            except BaseException:
                os.close(fd)
                raise
            return self
        raise LockBusy(f"could not lock {self.path}: it is being replaced over and over")

    def _claim(self, fd: int) -> None:
        prev = _read_info(self.path)
        st = os.fstat(fd)
        host = socket.gethostname()
        if prev and prev.get("host") not in (None, host) and time.time() - st.st_mtime < FOREIGN_STALE_SECONDS:
            raise LockBusy(
                f"{self.store} is being written by {_describe(prev)} (lock {self.path}, refreshed "
                f"{time.time() - st.st_mtime:.0f} s ago); wait for that run to finish. If no featstore run is active "
                f"on {prev.get('host')}, delete {self.path} and run again")
        if prev:
            pid = prev.get("pid")
            if prev.get("host") not in (None, host):
                why = f"untouched for {(time.time() - st.st_mtime) / 60:.0f} min"
            elif isinstance(pid, int) and not _pid_alive(pid):
                why = "no longer running"
            else:
                why = "which no longer holds it"
            self.note = f"took over the stale lock {self.path.name} of {_describe(prev)} ({why})"
        self.info = {"pid": os.getpid(), "host": host, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "command": self.command}
        data = json.dumps(self.info).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        self.fd = fd

    def _acquire_exclusive(self) -> "WriterLock":
        """Fallback where ``flock`` is unsupported: exclusive creation of the lock file."""
        for _ in range(50):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                prev = _read_info(self.path)
                try:
                    age = time.time() - os.stat(self.path).st_mtime
                except FileNotFoundError:
                    continue
                host = socket.gethostname()
                pid = prev.get("pid")
                stale = (prev.get("host") == host and isinstance(pid, int) and not _pid_alive(pid)) or (
                    prev.get("host") != host and age >= FOREIGN_STALE_SECONDS) or (not prev and age >= 60)
                if not stale:
                    raise LockBusy(self._busy(prev)) from None
                # take the stale file over by renaming it away: only one contender can rename it
                grave = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
                try:
                    os.rename(self.path, grave)
                except FileNotFoundError:
                    continue
                os.unlink(grave)
                self.note = f"took over the stale lock {self.path.name} of {_describe(prev)}"
                continue
            self.info = {"pid": os.getpid(), "host": socket.gethostname(),
                         "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": self.command}
            os.pwrite(fd, json.dumps(self.info).encode(), 0)
            self.fd = fd
            return self
        raise LockBusy(f"could not create {self.path}")

    def _busy(self, info: dict) -> str:
        return (f"{self.store} is being written by {_describe(info)} (lock {self.path}); "
                "wait for that run to finish, or stop it, then run again")

    # -- while held ---------------------------------------------------------------------------
    def heartbeat(self) -> None:
        """Refresh the lock file's time stamp; raise :class:`LockLost` if it names another writer."""
        if self.fd is None:
            return
        now = _read_info(self.path)
        if now and (now.get("pid"), now.get("host")) != (self.info.get("pid"), self.info.get("host")):
            raise LockLost(f"{self.path} now names {_describe(now)}: two writers on one store (a shared file system "
                           "without locking?); this run stops, its committed batches are kept")
        try:
            os.utime(self.fd)
        except OSError:
            pass

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if _read_info(self.path).get("pid") == self.info.get("pid"):
                os.unlink(self.path)
        except OSError:
            pass
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
