"""The faults of a shared cluster, turned into one clear line: disk full, a second writer, out of memory.

* :func:`disk_guard` wraps the writing part of a verb: an exception anywhere in it whose cause
  is a full disk or quota (``ENOSPC`` / ``EDQUOT``, or the same reported by torch, safetensors or
  blosc2 in their own words) becomes a :class:`DiskFullError` naming the folder, what was being
  written and the space left there. Every file neurofm writes is written to a temporary name and
  renamed, so nothing half-written is left where a re-run would take it as finished.
* :class:`FolderLock` keeps a second process from writing the same store shard or run folder: a
  lock file names the holder (host, pid, command, start); a lock whose process is gone (same host)
  or whose heartbeat stopped (another host) is stale and taken over.
* :class:`OutOfMemory` is raised with the batch size and patch in use and the largest that fits.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from neurofm.errors import NeurofmError

#: words other libraries use for a full disk (torch: "file write failed" is checked against the free space)
_FULL = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122", "errno 28")


class DiskFullError(NeurofmError):
    """The disk (or quota) filled up while writing; finished work is kept."""


class LockedError(NeurofmError):
    """Another process is writing the same store shard or run folder."""


class OutOfMemory(NeurofmError):
    """A training step did not fit in memory; the message names what would."""


def exception_chain(e: BaseException) -> Iterator[BaseException]:
    """``e`` and the exceptions that caused it or were being handled when it was raised."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__  # type: ignore[assignment]


def is_disk_full(e: BaseException, folder: str | Path | None = None) -> bool:
    """Whether ``e`` (or what caused it) is a full disk or quota; a bare write failure counts when
    ``folder``'s device has under 1 MiB left."""
    for x in exception_chain(e):
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(x).lower()
        if any(w in text for w in _FULL):
            return True
        if folder is not None and "write failed" in text and free_bytes(folder) < 2**20:
            return True
    return False


def free_bytes(folder: str | Path) -> int:
    """Free bytes on the device that holds ``folder`` (its nearest existing parent)."""
    p = Path(folder).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return 2**62


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _filename(e: BaseException, folder: str | Path) -> str | None:
    """The file in ``folder`` that the failed write was for, where the error names one."""
    root = Path(folder).absolute()
    for x in exception_chain(e):
        name = getattr(x, "filename", None)
        if name and Path(name).absolute().is_relative_to(root):
            return str(name)
    return None


@contextmanager
def disk_guard(
    folder: str | Path, what: str, then: str = "free space and run the same command again"
) -> Iterator[None]:
    """Turn a full disk inside the block into one :class:`DiskFullError` line (see module docstring)."""
    try:
        yield
    except NeurofmError:
        raise
    except BaseException as e:
        if not is_disk_full(e, folder):
            raise
        where = _filename(e, folder) or str(folder)
        raise DiskFullError(
            f"{where}: no space left on the device while {what} ({human(free_bytes(folder))} free there); {then}"
        ) from None


# ------------------------------------------------------------------------------ locks
def _process_started(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), from /proc; None where that cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime, in clock ticks after boot
        lines = Path("/proc/stat").read_text().splitlines()
        boot = next(float(line.split()[1]) for line in lines if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_rank() -> int:
    """This process's global rank under torchrun / SLURM / Lightning's launcher (0 when alone)."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def _is_parent(holder: dict[str, Any], host: str) -> bool:
    """Whether the lock's holder is the process that started this one (multiprocessing's spawn or forkserver)."""
    import multiprocessing

    parent = multiprocessing.parent_process()
    return parent is not None and holder.get("host") == host and holder.get("pid") == parent.pid


class FolderLock:
    """An exclusive lock file ``path`` naming its holder; refresh its heartbeat while held.

    A second process that finds it held raises :class:`LockedError` with the holder's host, pid,
    command and start time. A lock is stale (and taken over, with a note) when its process is gone
    (same host), when its pid now names a process that started after the lock was taken (same host, after a
    restart), or when its heartbeat is older than ``stale_after`` seconds (any host).
    """

    def __init__(self, path: str | Path, what: str, stale_after: float = 300.0, heartbeat: float = 30.0):
        self.path = Path(path)
        self.what = what
        self.stale_after = stale_after
        self.heartbeat = heartbeat
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.took_over: dict[str, Any] | None = None

    def _holder(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def _stale(self, holder: dict[str, Any]) -> bool:
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            if not _alive(holder["pid"]):
                return True
            try:  # when the lock was taken: this host's clock, to the second
                since = time.mktime(time.strptime(holder["started"], "%Y-%m-%dT%H:%M:%S"))
            except (KeyError, TypeError, ValueError):
                return False
            started = _process_started(holder["pid"])
            # a machine restarted after a kill hands the old pid to another process
            return started is not None and started > since + 2.0
        return age > self.stale_after

    def acquire(self) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "command": " ".join(["neurofm", *sys.argv[1:]])[:300],
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "what": self.what,
        }
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder.get("pid") == os.getpid() and holder.get("host") == me["host"]:
                    raise LockedError(f"{self.path.parent}: this process already holds {self.path.name}") from None
                if self._stale(holder):
                    self.took_over = holder
                    self.path.unlink(missing_ok=True)
                    continue
                if _is_parent(holder, me["host"]):
                    raise LockedError(
                        f"{self.path.parent} is held by this process's parent (pid {holder['pid']}): a child process "
                        f"(a data-loader worker, which re-imports the script that started it) is running that script's "
                        f'work again. Keep a script\'s top-level code under `if __name__ == "__main__":`'
                    ) from None
                raise LockedError(
                    f"{self.path.parent} is being written by another process (host {holder.get('host', '?')}, "
                    f"pid {holder.get('pid', '?')}, since {holder.get('started', '?')}: {holder.get('command', '?')}); "
                    f"wait for it, or remove {self.path} if that process is gone"
                ) from None
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            break
        else:
            raise LockedError(f"{self.path}: could not take the lock")
        if self.heartbeat > 0:
            self._thread = threading.Thread(target=self._beat, daemon=True)
            self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        if self._holder().get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
