"""s3://BUCKET/PREFIX on AWS S3 or any S3-compatible server (MinIO, R2, GCS interop) via endpoint_url.

Writers stream into a multipart upload: data is buffered and cut into parts of exactly
`part_size` bytes (S3 wants >= 5 MiB for every part but the last) as it grows; commit uploads the
tail and completes the upload. An object smaller than one part at commit goes up in a single
put_object instead. Any failure aborts the multipart upload so no orphan parts are billed; if the
abort itself cannot reach the server, the error says so and `abort_incomplete()` (or a bucket
lifecycle rule AbortIncompleteMultipartUpload) cleans up later.

Retries with backoff are botocore's own (adaptive mode). Credentials come only from boto3's
chain (environment, profile, instance/pod role); the store never reads, prints or pickles them.
"""

from __future__ import annotations

import mimetypes
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

from pipeline.storage.base import ObjectNotFound, ObjectStore, ObjectWriter, StorageError, check_key

MIB = 1 << 20
MIN_PART_SIZE = 5 * MIB
MAX_PARTS = 10_000


def _content_type(key: str) -> str:
    return mimetypes.guess_type(key)[0] or "application/octet-stream"


def _public_endpoint(endpoint_url: str) -> str:
    """The endpoint without any user:password@ part, for messages and reprs."""
    if not endpoint_url:
        return "AWS"
    u = urlsplit(endpoint_url)
    host = u.hostname or ""
    return f"{u.scheme}://{host}{f':{u.port}' if u.port else ''}{u.path}"


class S3Writer(ObjectWriter):
    """A multipart upload fed by write(); see the module docstring."""

    def __init__(self, store: S3Store, key: str, uri: str, part_size: int):
        super().__init__(uri)
        self.store, self.key, self.part_size = store, key, part_size
        self.upload_id: str | None = None
        self.parts: list[dict] = []  # [{"PartNumber": n, "ETag": etag}]
        self._buffer = bytearray()

    def write(self, data: bytes) -> int:
        self._check_open()
        self._buffer += data
        self.bytes_written += len(data)
        while len(self._buffer) >= self.part_size:
            self._upload_part(bytes(self._buffer[:self.part_size]))
            del self._buffer[:self.part_size]
        return len(data)

    def _upload_part(self, body: bytes) -> None:
        client, bucket = self.store.client, self.store.bucket
        try:
            if self.upload_id is None:
                self.upload_id = client.create_multipart_upload(
                    Bucket=bucket, Key=self.key, ContentType=_content_type(self.key))["UploadId"]
            if len(self.parts) == MAX_PARTS:
                raise StorageError(self.uri, f"more than {MAX_PARTS} parts: raise storage.s3.part_size_mib "
                                             f"(now {self.part_size // MIB})")
            number = len(self.parts) + 1
            etag = client.upload_part(Bucket=bucket, Key=self.key, UploadId=self.upload_id,
                                      PartNumber=number, Body=body)["ETag"]
            self.parts.append({"PartNumber": number, "ETag": etag})
        except (ClientError, BotoCoreError, StorageError) as e:
            self._fail(e, "upload failed")

    def commit(self) -> str:
        self._check_open()
        client, bucket = self.store.client, self.store.bucket
        if self.upload_id is None:  # smaller than one part: a single request
            try:
                client.put_object(Bucket=bucket, Key=self.key, Body=bytes(self._buffer),
                                  ContentType=_content_type(self.key))
            except (ClientError, BotoCoreError) as e:
                self._fail(e, "upload failed")
        else:
            if self._buffer:
                self._upload_part(bytes(self._buffer))
            try:
                client.complete_multipart_upload(Bucket=bucket, Key=self.key, UploadId=self.upload_id,
                                                 MultipartUpload={"Parts": self.parts})
            except (ClientError, BotoCoreError) as e:
                self._fail(e, "completing the upload failed")
        self._buffer = bytearray()
        self.state = "committed"
        return self.uri

    def abort(self) -> None:
        if self.state != "open":
            return
        self.state = "aborted"
        self._buffer = bytearray()
        if self.upload_id is None:
            return
        try:
            self.store.client.abort_multipart_upload(Bucket=self.store.bucket, Key=self.key,
                                                     UploadId=self.upload_id)
        except (ClientError, BotoCoreError) as e:
            if isinstance(e, ClientError) and e.response.get("Error", {}).get("Code") == "NoSuchUpload":
                return  # already gone
            raise StorageError(self.uri, f"could not abort multipart upload {self.upload_id} "
                                         f"({self.store.error_reason(e)}); S3Store.abort_incomplete() or a "
                                         "lifecycle rule AbortIncompleteMultipartUpload removes it") from None

    def _fail(self, e: Exception, what: str) -> None:
        """Abort the upload and raise one line about the first failure."""
        reason = e.reason if isinstance(e, StorageError) else self.store.error_reason(e)
        try:
            self.abort()
        except StorageError as abort_error:
            raise StorageError(self.uri, f"{what}: {reason}; {abort_error.reason}") from None
        raise StorageError(self.uri, f"{what}: {reason}") from None


class S3Store(ObjectStore):
    """Objects under s3://bucket/prefix. Picklable (for Ray): the boto3 client is rebuilt on use."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str = "", region: str = "",
                 part_size_mib: int = 8, max_attempts: int = 5):
        if part_size_mib * MIB < MIN_PART_SIZE:
            raise ValueError(f"storage.s3.part_size_mib: must be >= 5 (got {part_size_mib})")
        if max_attempts < 1:
            raise ValueError(f"storage.s3.max_attempts: must be >= 1 (got {max_attempts})")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.endpoint_url, self.region = endpoint_url, region
        self.part_size, self.max_attempts = part_size_mib * MIB, max_attempts
        self.root = f"s3://{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self._client = None

    @classmethod
    def from_uri(cls, uri: str, endpoint_url: str = "", region: str = "", part_size_mib: int = 8,
                 max_attempts: int = 5) -> S3Store:
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        if not bucket:
            raise ValueError(f"storage.uri: s3:// needs a bucket, as in s3://bucket/prefix (got {uri!r})")
        return cls(bucket, prefix, endpoint_url, region, part_size_mib, max_attempts)

    @property
    def client(self):
        if self._client is None:
            # A session of our own: boto3's module-level default session is process-global state.
            # `total_max_attempts` counts the first try too, as storage.s3.max_attempts does.
            config = Config(retries={"total_max_attempts": self.max_attempts, "mode": "adaptive"},
                            # S3-compatible servers (MinIO, moto, IP endpoints) rarely serve bucket.host
                            s3={"addressing_style": "path"} if self.endpoint_url else None)
            self._client = boto3.session.Session().client(
                "s3", endpoint_url=self.endpoint_url or None, region_name=self.region or None, config=config)
        return self._client

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_client"] = None  # holds resolved credentials; never pickled
        return state

    def __repr__(self) -> str:
        return f"S3Store({self.root!r}, endpoint={_public_endpoint(self.endpoint_url)!r})"

    # --- errors ---------------------------------------------------------------------------------
    def error_reason(self, e: Exception) -> str:
        """One line for a botocore error; never includes credentials."""
        if isinstance(e, ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code", "")) or str(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
            if code == "NoSuchBucket":
                return f"bucket {self.bucket!r} does not exist"
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"):
                return f"access denied ({code})"
            message = str(err.get("Message", "")).splitlines()[0] if err.get("Message") else ""
            return f"{code}: {message}" if message else code
        if isinstance(e, NoCredentialsError):
            return "no credentials found by boto3 (environment, ~/.aws profile, instance or pod role)"
        if isinstance(e, EndpointConnectionError):
            return f"cannot reach {_public_endpoint(self.endpoint_url)}"
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"

    def _raise(self, key: str, e: Exception) -> None:
        if isinstance(e, ClientError) and e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
            raise ObjectNotFound(self.uri(key)) from None
        raise StorageError(self.uri(key), self.error_reason(e)) from None

    # --- objects --------------------------------------------------------------------------------
    def _full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def open_writer(self, key: str) -> S3Writer:
        return S3Writer(self, self._full(check_key(key)), self.uri(key), self.part_size)

    def get(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._full(check_key(key)))["Body"].read()
        except (ClientError, BotoCoreError) as e:
            self._raise(key, e)

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._full(check_key(key)))
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                return False
            self._raise(key, e)
        except BotoCoreError as e:
            self._raise(key, e)

    def list(self, prefix: str = "") -> list[str]:
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                          Prefix=self._full(prefix))
            for page in pages:
                keys += [obj["Key"][strip:] for obj in page.get("Contents", [])]
        except (ClientError, BotoCoreError) as e:
            raise StorageError(f"{self.root}/{prefix}", self.error_reason(e)) from None
        return sorted(keys)

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._full(check_key(key)))
        except (ClientError, BotoCoreError) as e:
            self._raise(key, e)

    def abort_incomplete(self, prefix: str = "") -> list[str]:
        """Abort every multipart upload in progress under `prefix` (also other writers' ones:
        run it when none are active). Returns the keys whose uploads were aborted."""
        strip = len(self.prefix) + 1 if self.prefix else 0
        aborted = []
        try:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket,
                                                                                 Prefix=self._full(prefix))
            for page in pages:
                for up in page.get("Uploads", []):
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=up["Key"],
                                                       UploadId=up["UploadId"])
                    aborted.append(up["Key"][strip:])
        except (ClientError, BotoCoreError) as e:
            raise StorageError(f"{self.root}/{prefix}", self.error_reason(e)) from None
        return aborted
