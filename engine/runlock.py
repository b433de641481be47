"""One writer per directory: a run directory (--out) or a teacher-cache entry is held by one process at a time.

The lock is an flock(2) on a small file holding the owner's pid and host. The kernel drops an flock when its
process ends, however it ends (kill -9 included), so a lock left by a killed process is simply free: the next
run takes it over without any stale-lock guessing. The pid in the file is only for the message.
"""
import fcntl
import os
import socket
from pathlib import Path

from engine.errors import RunDirectoryBusy


class DirectoryLock:
    """DirectoryLock(path, what).acquire() holds <path> (a lock file) exclusively until release()."""

    def __init__(self, path, what):
        self.path, self.what, self.fd = Path(path), what, None

    def owner(self):
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def acquire(self):
        """Take the lock, or raise RunDirectoryBusy naming the process that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirectoryBusy(f"{self.what} is in use by another segkd process ({self.owner()}; lock "
                                   f"{self.path}): wait for it to finish, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self.fd = fd
        return self

    def release(self):
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
