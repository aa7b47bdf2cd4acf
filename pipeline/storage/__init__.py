"""Object storage for videos and their metadata: file:// (default) and s3:// (any S3-compatible)."""

from __future__ import annotations

from pipeline.storage.base import ObjectNotFound, ObjectStore, ObjectWriter, StorageError, check_key
from pipeline.storage.file import FileStore
from pipeline.storage.s3 import S3Store

__all__ = ["FileStore", "ObjectNotFound", "ObjectStore", "ObjectWriter", "S3Store", "StorageError", "check_key",
           "open_store"]


def open_store(storage_cfg) -> ObjectStore:
    """StorageConfig (uri, s3) -> the store its URI scheme names."""
    uri = storage_cfg.uri
    if uri.startswith("file://"):
        return FileStore.from_uri(uri)
    if uri.startswith("s3://"):
        s3 = storage_cfg.s3
        return S3Store.from_uri(uri, endpoint_url=s3.endpoint_url, region=s3.region,
                                part_size_mib=s3.part_size_mib, max_attempts=s3.max_attempts)
    raise ValueError(f"storage.uri: must start with file:// or s3:// (got {uri!r})")
