"""Safe files: every write of the project goes through `atomic_write`; shared caches use `locked`.

    atomic_write(path, obj, what="checkpoint")  # str -> text, bytes -> bytes, callable(f) -> what
                                                # it writes to f, else torch.save; old file kept
    with locked(folder, log=print):             # one builder of a shared cache at a time
        ...

A crash, a kill or a full disk mid-write leaves the previous file as it was and no temp file
behind (temp file in the same folder, flush + fsync, then rename). An OSError while writing
(ENOSPC, EIO, EACCES, EROFS, ...) becomes a WriteError whose message is one line: what was being
written, where, the error and, for a full disk, the free space and the size needed. Needs torch
only for torch.save of objects.
"""

import contextlib
import errno
import fcntl
import hashlib
import io
import os
import tempfile
import time

_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: mkstemp makes 0600 files; a written file gets 0666 & ~umask
TEMP_SUFFIX = ".tmp"


class WriteError(OSError):
    """A file could not be written; str(e) is one line for the user. The old file is intact."""


def _size(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _payload(obj):
    """obj -> bytes: serialised in memory first, so a failure to serialise touches no file and a
    full disk can be reported with the size needed."""
    if isinstance(obj, str):
        return obj.encode()
    if isinstance(obj, (bytes, bytearray)):
        return bytes(obj)
    buf = io.BytesIO()
    if callable(obj):
        obj(buf)
    else:
        import torch

        torch.save(obj, buf)
    return buf.getvalue()


def atomic_write(path, obj, what="file"):
    """Write obj to path atomically (see the module docstring). OSError -> WriteError (one line)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    data = _payload(obj)
    existed = os.path.exists(path)
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            dir=folder, prefix=f".{os.path.basename(path)}.", suffix=TEMP_SUFFIX
        )
        with os.fdopen(fd, "wb") as f:
            os.fchmod(fd, 0o666 & ~_UMASK)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise WriteError(_message(e, what, path, folder, len(data), existed)) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)


def _message(e, what, path, folder, size, existed):
    msg = f"could not write {what} {path}: {e.strerror or e}"
    if e.errno == errno.ENOSPC:
        with contextlib.suppress(OSError):
            st = os.statvfs(folder)
            msg += f" ({_size(st.f_bavail * st.f_frsize)} free, {_size(size)} needed)"
    return msg + ("; the previous file is unchanged" if existed else "; no partial file was left")


def temp_files(folder):
    """Temp files atomic_write left in folder: only a process killed mid-write leaves one."""
    with contextlib.suppress(OSError):
        return sorted(
            os.path.join(folder, n)
            for n in os.listdir(folder)
            if n.startswith(".") and n.endswith(TEMP_SUFFIX) and n.count(".") >= 3
        )
    return []


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def locked(folder, log=None):
    """Hold an exclusive lock on <folder>/.lock (flock: released by the OS if the holder dies).
    A second process waits, saying so once, then continues; it should re-check what the first
    built."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".lock"), "a+") as f:
        try:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if log:
                    log(f"waiting for another process building {folder} ...")
                t0 = time.time()
                fcntl.flock(f, fcntl.LOCK_EX)
                if log:
                    log(f"... it finished after {time.time() - t0:.0f}s")
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
