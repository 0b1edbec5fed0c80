"""One writer per store or output directory: an advisory lock file beside it.

`<parent>/.<name>.lock` (beside, not inside: `--overwrite` swaps the directory itself) is held with
flock(2) for as long as the writer runs and holds JSON naming it: pid, host, start time, command and how
many ranks. A second writer, with or without --overwrite, fails at once with one line naming the holder.
The kernel drops a flock when its process dies, however it dies (kill -9 included), so a lock file left
by a dead process is simply taken over by the next writer, which says so; on NFS the server does the
same when the client's lease lapses. Readers never lock: they read complete stores and finished layers.

Under torchrun, rank 0 takes the lock in the name of the whole run (the launcher's pid is recorded) and
the other ranks share it: see `csae.shared.ranks.Ranks.first`.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from csae.shared.errors import UserError

log = logging.getLogger(__name__)


def lock_path(target: str | Path) -> Path:
    target = Path(target)
    return target.parent / f".{target.name}.lock"


def local_target(location: str | Path) -> Path | None:
    """The local path of a store location, or None for a remote URL (which cannot be locked)."""
    text = str(location)
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    return None if "://" in text else Path(text)


def describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process (it has not written its details yet)"
    ranks = f", {holder['ranks']} ranks" if holder.get("ranks", 1) > 1 else ""
    return (f"`{holder.get('command', '?')}` (pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
            f"started {holder.get('started', '?')}{ranks})")


class Lock:
    """An exclusive writer's lock on `target` (a local path; remote URLs are not locked, see `acquire`)."""

    def __init__(self, target: str | Path, *, command: str, what: str, option: str, pid: int | None = None,
                 ranks: int = 1) -> None:
        self.target, self.what, self.option = str(target), what, option
        self.local = local_target(target)
        self.info = {"pid": pid or os.getpid(), "host": socket.gethostname(), "command": command, "ranks": ranks,
                     "started": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")}
        self._fd: int | None = None

    @property
    def path(self) -> Path | None:
        return lock_path(self.local) if self.local is not None else None

    def acquire(self) -> Lock:
        if self.path is None:
            if not self.target.startswith("memory://"):
                log.warning("%s is a remote store: it cannot be locked, so make sure no other process writes it",
                            self.target)
            return self
        for _ in range(10):  # the file can be removed between open and flock by a holder releasing it
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as err:
                raise UserError(f"cannot write to {self.what} {self.target} ({err.strerror or err}); choose another "
                                f"{self.option}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise UserError(f"{self.what} {self.target} is being written by {describe(holder)}; wait for it to "
                                f"finish or stop it (a second writer would mix their results)") from None
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    log.warning("cannot lock %s on this filesystem (%s); make sure no other process writes it",
                                self.target, err.strerror)
                    return self
                raise
            if _same_file(fd, self.path):
                break
            os.close(fd)
        else:
            raise UserError(f"cannot lock {self.target}: its lock file {self.path} keeps changing; retry")
        previous = _read(fd)
        if previous:
            log.info("taking over the lock of %s: that process is no longer running", describe(previous))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self.info).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:  # unlink while still holding it: a waiter that opened this file re-checks the inode
            if self.path is not None and _same_file(self._fd, self.path):
                self.path.unlink()
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Lock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read(fd: int) -> dict[str, Any]:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        return json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {}


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False
