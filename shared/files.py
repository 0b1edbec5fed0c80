"""Files and directories that a crash never leaves half-written, disk-full errors that say so, and damaged
files named in one line.

- `atomic_write`: a temporary file beside the target, renamed over it when complete; created with the
  user's umask (mkstemp alone would make every output 0600).
- `replace_dir`: put a finished directory where an old one is, exchanging the two names atomically where
  Linux can (renameat2 RENAME_EXCHANGE), so readers see the old or the new, never neither.
- `staged_outputs`: a command's output directory rebuilt beside the old one under its writer lock and swapped
  in whole when every file is written; what else the old directory held is carried over.
- `dump_json`: JSON with sorted keys, atomically, so identical results give identical bytes.
- `DiskFull`: raised for ENOSPC/EDQUOT, or when a write failed and the filesystem has less free space than
  the write needed (torch.save reports a full disk as `RuntimeError: ... unexpected pos`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import functools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from csae.shared.errors import UserError
from csae.shared.locks import Lock

log = logging.getLogger(__name__)

#: The suffix of atomic_write's temporary files; `sweep_temp` removes leftovers of killed writers.
TMP_SUFFIX = ".tmp"
_MIB = 2**20


@functools.cache
def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class DiskFull(UserError):
    """A write failed for lack of space; `need` and `free` are bytes (need may be an estimate)."""

    def __init__(self, path: str | Path, need: int | None, free: int | None, fix: str = "") -> None:
        self.path, self.need, self.free, self.fix = str(path), need, free, fix
        needed = f"needs about {need / _MIB:,.1f} MiB, " if need else ""
        left = f"{free / _MIB:,.1f} MiB free" if free is not None else "free space unknown"
        super().__init__(f"disk full: cannot write {path} ({needed}{left}); free space there or write elsewhere"
                         + (f", {fix}" if fix else ""))


def free_bytes(path: str | Path) -> int | None:
    """Bytes available to this user on the filesystem holding `path` (or its nearest existing parent)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def is_disk_full(err: BaseException, path: str | Path, need: int | None) -> bool:
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    free = free_bytes(path)
    return free is not None and free < max(need or 0, _MIB)


@contextlib.contextmanager
def disk_full_as_error(path: str | Path, need: int | None = None, fix: str = "") -> Iterator[None]:
    """Turn a failed write under this block into `DiskFull` when the disk is the reason."""
    try:
        yield
    except DiskFull as err:
        if fix and not err.fix:  # a write deep down knew the path; this caller knows the fix
            raise DiskFull(err.path, err.need, err.free, fix) from err
        raise
    except (OSError, RuntimeError) as err:
        if is_disk_full(err, path, need):
            raise DiskFull(path, need, free_bytes(path), fix) from err
        raise


def atomic_write(path: Path, write: Callable[[str], object], *, need: int | None = None) -> None:
    """Call `write(tmp)` on a temporary file in the same directory, then rename it to `path`: readers see
    the old file or the new one, never a partial one. `need` (bytes) is what a disk-full error reports."""
    with disk_full_as_error(path, need):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
        os.close(fd)
        try:
            write(tmp)
            os.chmod(tmp, 0o666 & ~umask())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def sweep_temp(directory: Path, patterns: tuple[str, ...] = (f".*{TMP_SUFFIX}",)) -> int:
    """Remove what killed writers left under `directory` (call it while holding the directory's lock)."""
    found = [p for pattern in patterns for p in directory.rglob(pattern)] if directory.is_dir() else []
    for p in found:
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    if found:
        size = sum(p.stat().st_size for p in found if p.exists())
        log.info("removed %d temporary file(s) left by an interrupted run in %s%s", len(found), directory,
                 f" ({size / _MIB:.1f} MiB)" if size else "")
    return len(found)


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names `a` and `b` atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def displaced(target: Path) -> Path:
    """Where the old directory waits for deletion when names cannot be exchanged atomically."""
    return target.parent / f".{target.name}.old"


def replace_dir(new: Path, target: Path) -> None:
    """Put the finished directory `new` at `target`, then delete what was there."""
    if not target.exists():
        os.rename(new, target)
        return
    if _exchange(new, target):
        shutil.rmtree(new)
        return
    old = displaced(target)  # two renames: `recover_displaced` repairs a crash between them
    shutil.rmtree(old, ignore_errors=True)
    os.rename(target, old)
    os.rename(new, target)
    shutil.rmtree(old)


def recover_displaced(target: Path) -> None:
    """After a crash inside `replace_dir`'s fallback: put the old directory back if the target is missing,
    else delete it (call while holding the target's lock)."""
    old = displaced(target)
    if not old.exists():
        return
    if target.exists():
        shutil.rmtree(old)
    else:
        os.rename(old, target)
        log.info("restored %s, which an interrupted replacement had moved aside", target)


def dump_json(path: Path, data: Any, indent: int = 2) -> None:
    """`data` as JSON with sorted keys (one byte sequence per content, whatever the dicts' order), atomically."""
    text = json.dumps(data, indent=indent, sort_keys=True) + "\n"
    atomic_write(path, lambda p: Path(p).write_text(text))


def staging(out: Path) -> Path:
    """Where `staged_outputs` builds the new contents of `out`."""
    return out.parent / f".{out.name}.new"


@contextlib.contextmanager
def staged_outputs(out: Path, owned: tuple[str, ...], *, command: str, option: str = "--out") -> Iterator[Path]:
    """Hold `out`'s writer lock (csae.shared.locks) and yield an empty directory beside it for the new results.
    When the block ends without error, the entries of the old `out` that are not results (none of the `owned`
    name patterns: a feature browser built inside it, DVC's .gitignore) are moved into the new directory,
    which then takes `out`'s place atomically (`replace_dir`). A kill at any moment leaves the old results or
    the new ones, never a mix; the next writer removes an unfinished build and puts back what it had taken."""
    with Lock(out, command=command, what="output directory", option=option):
        if out.exists() and not out.is_dir():
            raise UserError(f"{option} {out} is a file, not a directory; choose another {option}")
        new = staging(out)
        _recover(out, new, owned)
        try:
            with disk_full_as_error(out.parent):
                new.mkdir()
        except OSError as err:
            raise UserError(f"cannot write to output directory {out} ({err.strerror or err}); choose another "
                            f"{option}") from None
        try:
            yield new
        except BaseException:
            shutil.rmtree(new, ignore_errors=True)
            raise
        for entry in _foreign(out, owned):
            if not (new / entry.name).exists():
                os.rename(entry, new / entry.name)
        replace_dir(new, out)


def _foreign(out: Path, owned: tuple[str, ...]) -> list[Path]:
    """What `out` holds besides results (names matching none of `owned`)."""
    entries = sorted(out.iterdir()) if out.is_dir() else []
    return [p for p in entries if not any(fnmatch.fnmatchcase(p.name, pattern) for pattern in owned)]


def _recover(out: Path, new: Path, owned: tuple[str, ...]) -> None:
    """Holding the lock: undo what a killed `staged_outputs` left (a replacement moved aside, entries carried
    into an unfinished build), then drop the unfinished build."""
    recover_displaced(out)
    if not new.exists():
        return
    out.mkdir(exist_ok=True)
    for entry in _foreign(new, owned):
        if not (out / entry.name).exists():
            os.rename(entry, out / entry.name)
    log.info("removing %s, left by an interrupted run", new)
    shutil.rmtree(new)


#: What to do about a damaged checkpoint file.
RETRAIN = "re-train that layer: `train fit --layers <L> --overwrite` (with the run's other settings)"


def read_safetensors(path: Path, fix: str = RETRAIN) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; one line naming the file when it is missing or damaged."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        reason = "it is missing" if isinstance(err, FileNotFoundError) else f"it is damaged ({_first_line(err)})"
        raise UserError(f"cannot read checkpoint file {path}: {reason}; {fix}") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:200]
