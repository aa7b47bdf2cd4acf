"""ObjectStore: where videos and their JSON go. Keys are relative, '/'-separated paths.

A writer streams one object: `write(bytes)` as data appears, `commit()` to publish it under its
key, `abort()` to leave nothing behind. Until commit, readers never see the key (file: a temporary
name renamed on commit; S3: a multipart upload completed on commit). As a context manager a
writer aborts unless it was committed:

    with store.open_writer("clip.mp4") as w:
        w.write(data)
        uri = w.commit()
"""

from __future__ import annotations

import abc
import re


class StorageError(Exception):
    """A storage operation failed; str() is one line naming the object's URI and the reason."""

    def __init__(self, uri: str, reason: str):
        self.uri, self.reason = uri, reason
        super().__init__(f"{uri}: {reason}")

    def __reduce__(self):  # pickle (Ray) rebuilds from the constructor's arguments, not from args
        return type(self), (self.uri, self.reason), self.__dict__


class ObjectNotFound(StorageError):
    def __init__(self, uri: str):
        super().__init__(uri, "no such object")

    def __reduce__(self):
        return type(self), (self.uri,), self.__dict__


_BAD_SEGMENT = re.compile(r"^(|\.|\.\.)$")


def check_key(key: str) -> str:
    """A key is a relative '/'-separated path without empty, '.' or '..' segments."""
    if not isinstance(key, str) or key.startswith("/") or "\\" in key or "\0" in key \
            or any(_BAD_SEGMENT.match(s) for s in key.split("/")):
        raise ValueError(f"object key: must be a relative path like 'dir/name.mp4' (got {key!r})")
    return key


class ObjectWriter(abc.ABC):
    """One object being written. Not thread-safe; one producer."""

    def __init__(self, uri: str):
        self.uri = uri
        self.bytes_written = 0
        self.state = "open"  # open -> committed | aborted

    @abc.abstractmethod
    def write(self, data: bytes) -> int:
        """Append `data`; returns len(data)."""

    @abc.abstractmethod
    def commit(self) -> str:
        """Publish the object under its key; returns its URI."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Drop everything written; idempotent, also after a failed write or commit."""

    def _check_open(self) -> None:
        if self.state != "open":
            raise StorageError(self.uri, f"writer is {self.state}")

    def __enter__(self) -> ObjectWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.state == "open":
            self.abort()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r}, {self.state}, {self.bytes_written} bytes)"


class ObjectStore(abc.ABC):
    """A flat namespace of objects under one root URI (file://DIR or s3://BUCKET/PREFIX)."""

    root: str  # the store's URI, without a trailing '/'

    @abc.abstractmethod
    def open_writer(self, key: str) -> ObjectWriter: ...

    @abc.abstractmethod
    def get(self, key: str) -> bytes: ...

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys (sorted) of the committed objects whose key starts with `prefix`."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; a missing key is not an error."""

    def put(self, key: str, data: bytes) -> str:
        """Write a whole object atomically; returns its URI."""
        with self.open_writer(key) as w:
            w.write(data)
            return w.commit()

    def uri(self, key: str) -> str:
        return f"{self.root}/{check_key(key)}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root!r})"
