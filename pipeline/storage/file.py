"""file://DIR: a local (or mounted) directory, the embedded default.

A writer writes to a hidden temporary name in the object's own directory and renames it onto the
key on commit (atomic on POSIX within one filesystem): the final name never holds a partial file,
and `abort` removes the temporary. `list` skips temporaries.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

from pipeline.storage.base import ObjectNotFound, ObjectStore, ObjectWriter, StorageError, check_key

_TEMP = re.compile(r"^\..+\.[0-9a-f]{16}\.partial$")


def _reason(e: OSError) -> str:
    return e.strerror or type(e).__name__


class FileWriter(ObjectWriter):
    def __init__(self, path: Path, uri: str):
        super().__init__(uri)
        self.path = path
        self.temp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.partial")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # O_EXCL: the random name is ours alone; mode 0o666 lets the umask decide, as open() would
            self._fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except OSError as e:
            raise StorageError(uri, f"cannot create in {path.parent}: {_reason(e)}") from None

    def write(self, data: bytes) -> int:
        self._check_open()
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as e:
            self.abort()
            raise StorageError(self.uri, f"write failed: {_reason(e)}") from None
        self.bytes_written += len(data)
        return len(data)

    def commit(self) -> str:
        self._check_open()
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self.state = "closed"
            os.replace(self.temp, self.path)
        except OSError as e:
            self.abort()
            raise StorageError(self.uri, f"commit failed: {_reason(e)}") from None
        self.state = "committed"
        try:  # make the rename durable too; some filesystems (network, FUSE) cannot fsync a directory
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            pass
        return self.uri

    def abort(self) -> None:
        if self.state in ("committed", "aborted"):
            return
        if self.state == "open":
            os.close(self._fd)
        self.state = "aborted"
        self.temp.unlink(missing_ok=True)


class FileStore(ObjectStore):
    """Objects are files under `directory` (relative paths are taken from the current directory)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory).expanduser().absolute()
        self.root = f"file://{self.directory.as_posix().rstrip('/')}"

    @classmethod
    def from_uri(cls, uri: str) -> FileStore:
        """file://outputs (relative to the current directory) or file:///abs/dir."""
        path = uri.removeprefix("file://")
        if not path:
            raise ValueError(f"storage.uri: file:// needs a directory (got {uri!r})")
        return cls(path)

    def _path(self, key: str) -> Path:
        return self.directory / check_key(key)

    def open_writer(self, key: str) -> FileWriter:
        return FileWriter(self._path(key), self.uri(key))

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise ObjectNotFound(self.uri(key)) from None
        except OSError as e:
            raise StorageError(self.uri(key), f"read failed: {_reason(e)}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        if not self.directory.is_dir():
            return []
        keys = []
        for dirpath, _, filenames in os.walk(self.directory):
            rel = Path(dirpath).relative_to(self.directory).as_posix()
            for name in filenames:
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix) and not _TEMP.match(name):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as e:
            raise StorageError(self.uri(key), f"delete failed: {_reason(e)}") from None
