"""Raw sequential file writes and reads of the store's writer: whole writes, direct I/O, reused buffers.

The writer's big writes (the layer blocks of a batch file; each layer of the finished HDF5 file)
go through :class:`Sink`: the bytes are gathered in a page-aligned staging buffer that is reused
from write to write, and written with ``O_DIRECT`` (past the page cache) where the file system
takes it, in whole multiples of :data:`DIRECT_ALIGN` at aligned offsets; the last partial block
and everything on a file system that refuses ``O_DIRECT`` are written plainly. Measured on the
project's 2-core VM (README, "Benchmarks"): filling fresh page-cache pages cost ~0.25 s per 100 MB,
the direct write of the same bytes 0.05 s. ``FEATSTORE_DIRECT_IO=0`` turns it off (every write
through the page cache, as before). The bytes in the file are the same either way.

Durability is unchanged: ``O_DIRECT`` does not make a write durable, the callers fsync as before.
"""
from __future__ import annotations

import errno
import mmap
import os
import threading
from typing import Any

#: file offsets, lengths and buffer addresses of direct writes are multiples of this (covers
#: devices with 512- and 4096-byte logical blocks)
DIRECT_ALIGN = 4096
#: size of one staging / read buffer (a multiple of DIRECT_ALIGN)
STAGE_BYTES = 8 << 20
#: ``FEATSTORE_DIRECT_IO=0``: no ``O_DIRECT`` (every write through the page cache)
DIRECT_ENV = "FEATSTORE_DIRECT_IO"
O_DIRECT = getattr(os, "O_DIRECT", 0)

_IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX")) if hasattr(os, "sysconf") else 1024
_pool: list[mmap.mmap] = []
_pool_lock = threading.Lock()


def direct_wanted() -> bool:
    """Whether direct writes are tried at all (the platform has ``O_DIRECT``; not turned off)."""
    return bool(O_DIRECT) and os.environ.get(DIRECT_ENV, "1").strip() != "0"


def take_buffer() -> mmap.mmap:
    """A page-aligned buffer of :data:`STAGE_BYTES` from the pool (its pages already touched)."""
    with _pool_lock:
        if _pool:
            return _pool.pop()
    return mmap.mmap(-1, STAGE_BYTES)


def give_buffer(buf: mmap.mmap) -> None:
    with _pool_lock:
        if len(_pool) < 4:
            _pool.append(buf)
            return
    buf.close()


def set_direct(fd: int, on: bool) -> bool:
    """Turn ``O_DIRECT`` on or off for ``fd``; False where the file system (or platform) refuses."""
    if not O_DIRECT:
        return not on
    import fcntl

    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, (flags | O_DIRECT) if on else (flags & ~O_DIRECT))
    except OSError:
        return False
    return True


def write_all(fd: int, data: Any, offset: int | None = None) -> int:
    """Write one buffer, or a list of buffers (one ``writev``/``pwritev`` per up to ``IOV_MAX`` of
    them), at the file position or at ``offset``, retrying short writes; returns the bytes written."""
    if not isinstance(data, list):
        data = [data]
    views = [v for v in (memoryview(d).cast("B") for d in data) if len(v)]
    total = sum(len(v) for v in views)
    i = 0  # the first buffer not yet written whole
    while i < len(views):
        chunk = views[i : i + _IOV_MAX]
        if offset is None:
            n = os.writev(fd, chunk) if len(chunk) > 1 else os.write(fd, chunk[0])
        else:
            if len(chunk) > 1 and hasattr(os, "pwritev"):  # (macOS has no pwritev: one buffer at a time)
                n = os.pwritev(fd, chunk, offset)
            else:
                n = os.pwrite(fd, chunk[0], offset)
            offset += n
        while n and i < len(views):  # skip what was written; keep the rest of a partly written buffer
            if n >= len(views[i]):
                n -= len(views[i])
                i += 1
            else:
                views[i] = views[i][n:]
                n = 0
    return total


def pread_into(fd: int, view: memoryview, offset: int) -> int:
    """One read into ``view`` at ``offset``; the bytes read (``preadv`` where the platform has it,
    ``pread`` and a copy elsewhere, e.g. macOS)."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], offset)
    data = os.pread(fd, len(view), offset)
    view[: len(data)] = data
    return len(data)


def read_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` from ``offset`` on (``ValueError`` when the file ends first)."""
    got = 0
    while got < len(view):
        n = pread_into(fd, view[got:], offset + got)
        if n == 0:
            raise ValueError(f"file ends after {offset + got} bytes")
        got += n


class _DirectFd:
    """A file descriptor read or written direct while that works (``self.direct``), plainly after."""

    fd: int
    direct: bool

    def _start(self, fd: int, direct: bool | None, aligned: bool = True) -> None:
        self.fd = fd
        want = direct_wanted() if direct is None else (direct and direct_wanted())
        self.direct = bool(want) and aligned and set_direct(fd, True)

    def _plain(self) -> None:
        if self.direct:
            set_direct(self.fd, False)
            self.direct = False


class Source(_DirectFd):
    """Reads of one file, direct (``O_DIRECT``, no page-cache pages filled: the batch files are read
    once, when the final file is built) where ``direct`` (default :func:`direct_wanted`), the read
    is aligned and the file system takes it; plain reads otherwise and after any refusal."""

    def __init__(self, path: Any, direct: bool | None = None):
        self._start(os.open(path, os.O_RDONLY), direct)

    def read(self, view: memoryview, offset: int, n: int) -> memoryview:
        """``n`` bytes from ``offset`` into ``view`` (a page-aligned buffer of at least ``n`` bytes
        rounded up to :data:`DIRECT_ALIGN`); returns ``view[:n]``. ``ValueError`` if the file ends first."""
        if n > len(view):
            raise ValueError(f"a buffer of {len(view)} bytes cannot take {n}")
        got = 0
        if self.direct and offset % DIRECT_ALIGN == 0:
            size = min(len(view), -(-n // DIRECT_ALIGN) * DIRECT_ALIGN)  # whole blocks (the file's padding)
            while got < n:
                try:
                    k = pread_into(self.fd, view[got:size], offset + got)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    k = -1
                if k == 0:
                    raise ValueError(f"file ends after {offset + got} bytes")
                if k < 0 or (got + k < n and k % DIRECT_ALIGN):  # refused, or a short read: plainly
                    self._plain()
                    got += max(k, 0)
                    break
                got += k
        elif self.direct:
            self._plain()
        if got < n:
            read_into(self.fd, view[got:n], offset + got)
        return view[:n]

    def close(self) -> None:
        os.close(self.fd)


class Sink(_DirectFd):
    """Sequential writes to ``fd`` from ``offset`` on: :meth:`write` buffers (bytes-like or lists of
    them), :meth:`close` writes the rest. Direct where ``direct`` (default :func:`direct_wanted`),
    ``offset`` is aligned and the file system takes it; on a refusal (``EINVAL``) or a short direct
    write the rest goes through the page cache. ``background``: the direct writes of full buffers
    run in a thread of their own (at most two in flight) while the caller fills the next one; call
    :meth:`wait` (or :meth:`release`) before using or closing ``fd``. One sink per file at a time."""

    def __init__(self, fd: int, offset: int = 0, direct: bool | None = None, background: bool = False):
        self.offset, self.fill = int(offset), 0
        self._start(fd, direct, aligned=self.offset % DIRECT_ALIGN == 0)
        self.buf = take_buffer() if self.direct else None
        self.view = memoryview(self.buf) if self.buf is not None else None
        self._pending: list[Any] = []
        self._pool = None
        if background and self.direct:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="featstore-write")

    def write(self, data: Any) -> None:
        if self.view is None:  # plain: straight from the caller's buffers
            self.offset += write_all(self.fd, data, self.offset)
            return
        for part in data if isinstance(data, list) else [data]:
            b = memoryview(part).cast("B")
            while len(b):
                k = min(len(b), len(self.view) - self.fill)
                self.view[self.fill : self.fill + k] = b[:k]
                self.fill += k
                b = b[k:]
                if self.fill == len(self.view):
                    self._drain()

    def _drain(self) -> None:
        """Write the staged bytes (here, or handed to the write thread with the buffer)."""
        buf, view, n, at = self.buf, self.view, self.fill, self.offset
        self.offset += n
        self.fill = 0
        if self._pool is None:
            self._put(view, n, at)
            return
        if len(self._pending) >= 2:
            self._pending.pop(0).result()
        self.buf = take_buffer()
        self.view = memoryview(self.buf)

        def job() -> None:
            try:
                self._put(view, n, at)
            finally:
                view.release()
                give_buffer(buf)

        self._pending.append(self._pool.submit(job))

    def _put(self, view: memoryview, n: int, at: int) -> None:
        """``view[:n]`` at ``at``: the aligned part direct (while direct works), the rest plainly."""
        m = n // DIRECT_ALIGN * DIRECT_ALIGN if self.direct else 0
        done = 0
        while done < m:
            try:
                got = os.pwrite(self.fd, view[done:m], at + done)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                got = 0
            if got <= 0 or got % DIRECT_ALIGN:  # refused or short: through the page cache from here
                self._plain()
                done += max(got, 0)
                break
            done += got
        if done < n:
            self._plain()
            write_all(self.fd, view[done:n], at + done)

    def close(self, wait: bool = True) -> None:
        """Write what is staged; with ``wait`` also wait for the writes and give the buffer back
        (else call :meth:`wait` later). The file descriptor stays open (plain)."""
        try:
            if self.view is not None and self.fill:
                self._drain()
        except BaseException:
            self.release()
            raise
        if wait:
            self.wait()

    def wait(self) -> None:
        """Wait for the background writes (the first error is raised), then :meth:`release`."""
        try:
            while self._pending:
                self._pending.pop(0).result()
        finally:
            self.release()

    def release(self) -> None:
        """Wait for writes in flight (their errors ignored), give the buffer back (after an error)."""
        for fut in self._pending:
            fut.exception()
        self._pending = []
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._plain()
        if self.buf is not None:
            self.view.release()
            give_buffer(self.buf)
            self.buf = self.view = None
