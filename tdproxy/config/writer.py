"""Replace the config file atomically, keeping its mode, owner and group.

The new text goes to a temporary file in the same directory, is flushed to disk, and is renamed
over the file: the config watcher of a running proxy (and anyone else reading it) sees the old
file or the new one, never a part. A symlink is followed, so the link stays a link.

Some files must not be written at all: a Kubernetes ConfigMap mount (the file is a symlink into
``..data``, replaced by the kubelet whenever the ConfigMap changes, so an edit would be lost or
fought over) and read-only files or directories. :class:`NotWritable` says why.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path


class NotWritable(Exception):
    """The file cannot or must not be written here; ``configmap`` when it is a ConfigMap mount."""

    def __init__(self, path: str, reason: str, *, configmap: bool = False) -> None:
        self.path = path
        self.reason = reason
        self.configmap = configmap
        super().__init__(f"cannot write {path}: {reason}")


def is_configmap_mount(path: str) -> bool:
    """``path`` is a symlink into a ``..data`` directory, as the kubelet mounts ConfigMaps."""
    return os.path.islink(path) and "..data" in Path(os.readlink(path)).parts


def read_only_reason(target: str) -> str | None:
    """Why ``target`` (a real file, not a link) is read-only, or ``None``. A file or directory
    with no write permission bits counts as read-only even for root: someone made it so."""
    directory = os.path.dirname(target) or "."
    if not stat.S_IMODE(os.stat(target).st_mode) & 0o222 or not os.access(target, os.W_OK):
        return "the file is read-only"
    if not stat.S_IMODE(os.stat(directory).st_mode) & 0o222 or not os.access(
        directory, os.W_OK | os.X_OK
    ):
        return f"its directory {directory} is read-only"
    return None


def replace_file(path: str, text: str) -> None:
    """Write ``text`` over the file at ``path`` atomically; :class:`NotWritable` if not allowed
    or not possible (the file is then unchanged)."""
    if is_configmap_mount(path):
        raise NotWritable(
            path,
            "it is mounted from a Kubernetes ConfigMap (a symlink into ..data)",
            configmap=True,
        )
    target = os.path.realpath(path)
    try:
        reason = read_only_reason(target)
        if reason is not None:
            raise NotWritable(path, reason)
        _write_atomically(target, text.encode("utf-8"))
    except PermissionError as exc:
        raise NotWritable(path, f"permission denied ({exc.strerror})") from None
    except OSError as exc:
        raise NotWritable(path, exc.strerror or str(exc)) from None


def _write_atomically(target: str, data: bytes) -> None:
    info = os.stat(target)
    directory = os.path.dirname(target) or "."
    fd, temporary = tempfile.mkstemp(
        prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=directory
    )
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fchmod(file.fileno(), stat.S_IMODE(info.st_mode))
            _keep_owner(file.fileno(), info, target)
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _sync_directory(directory)


def _keep_owner(fd: int, info: os.stat_result, target: str) -> None:
    if (info.st_uid, info.st_gid) == (os.geteuid(), os.getegid()):
        return
    try:
        os.fchown(fd, info.st_uid, info.st_gid)
    except PermissionError:
        raise NotWritable(
            target,
            f"cannot keep its owner and group (uid {info.st_uid}, gid {info.st_gid}): "
            "run this as the file's owner",
        ) from None


def _sync_directory(directory: str) -> None:
    """Make the rename itself durable (best effort: not every file system allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
