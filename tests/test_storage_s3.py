"""s3:// store against moto's S3 server on 127.0.0.1: multipart as data grows, put_object for small
objects, nothing left behind on abort or when the endpoint fails mid-upload, no credentials shown."""

import pickle
import random

import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError

from conftest import TEST_ACCESS_KEY, TEST_SECRET_KEY
from pipeline.config import S3Config, StorageConfig
from pipeline.storage import ObjectNotFound, S3Store, StorageError, open_store

MIB = 1 << 20


@pytest.fixture
def bucket(s3_server):
    return s3_server.create_bucket()


@pytest.fixture
def store(s3_server, bucket):
    return open_store(StorageConfig(uri=f"s3://{bucket}/runs", s3=S3Config(
        endpoint_url=s3_server.endpoint_url, region="us-east-1", part_size_mib=5, max_attempts=3)))


def uploads(s3_server, bucket):
    return s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def head(s3_server, bucket, key):
    try:
        return s3_server.client().head_object(Bucket=bucket, Key=key)
    except ClientError as e:
        return int(e.response["ResponseMetadata"]["HTTPStatusCode"])


def payload(n: int) -> bytes:
    return random.Random(n).randbytes(n)


class FailingEndpoint:
    """Makes the endpoint answer like a failing S3 server: once the `trigger` operation has been sent
    `after` times, the next `failures` requests (any operation) get 500 InternalError, then it
    recovers. Records every operation attempted."""

    BODY = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
            b"<Message>{message}</Message></Error>")

    def __init__(self, client, trigger, after=0, failures=1, status=500, code="InternalError",
                 message="We encountered an internal error. Please try again."):
        self.trigger, self.after, self.failures = trigger, after, failures
        self.status = status
        self.body = self.BODY.replace(b"{code}", code.encode()).replace(b"{message}", message.encode())
        self.seen, self.tripped, self.attempts = 0, False, []
        client.meta.events.register("before-send.s3", self.on_send)

    def on_send(self, request, event_name, **_):
        op = event_name.rsplit(".", 1)[-1]
        self.attempts.append(op)
        if op == self.trigger and not self.tripped:
            self.seen += 1
            self.tripped = self.seen > self.after
        if self.tripped and self.failures > 0:
            self.failures -= 1
            body = self.body
            return AWSResponse(request.url, self.status, {"Content-Type": "application/xml"},
                               type("Raw", (), {"stream": lambda self: iter([body])})())
        return None


def test_multipart_in_small_writes(s3_server, bucket, store):
    data = payload(12 * MIB)
    w = store.open_writer("v1/video.mp4")
    for i in range(0, len(data), 256 * 1024):
        w.write(data[i:i + 256 * 1024])
        if i == 6 * MIB:  # one part is up: the object is still invisible, one upload in progress
            assert len(w.parts) == 1 and len(uploads(s3_server, bucket)) == 1
            assert head(s3_server, bucket, "runs/v1/video.mp4") == 404
    assert w.commit() == f"s3://{bucket}/runs/v1/video.mp4"
    assert [p["PartNumber"] for p in w.parts] == [1, 2, 3]  # 5 + 5 + 2 MiB
    assert store.get("v1/video.mp4") == data
    meta = head(s3_server, bucket, "runs/v1/video.mp4")
    assert meta["ContentLength"] == 12 * MIB and meta["ETag"].endswith('-3"')
    assert meta["ContentType"] == "video/mp4"
    assert uploads(s3_server, bucket) == []


def test_small_object_goes_up_in_one_put(s3_server, bucket, store):
    w = store.open_writer("v.json")
    w.write(b'{"a": ')
    w.write(b"1}")
    w.commit()
    assert w.upload_id is None and store.get("v.json") == b'{"a": 1}'
    meta = head(s3_server, bucket, "runs/v.json")
    assert "-" not in meta["ETag"] and meta["ContentType"] == "application/json"
    store.put("empty.bin", b"")
    assert store.get("empty.bin") == b""


def test_exactly_one_part_completes_the_upload(store):
    data = payload(5 * MIB)
    with store.open_writer("one.bin") as w:
        w.write(data)
        w.commit()
    assert len(w.parts) == 1 and store.get("one.bin") == data


def test_list_exists_delete_and_missing(store, s3_server, bucket):
    for key in ("a/1.mp4", "a/1.json", "a10/x", "b.json"):
        store.put(key, b"x")
    s3_server.client().put_object(Bucket=bucket, Key="elsewhere/a/2.mp4", Body=b"x")  # outside the prefix
    assert store.list() == ["a/1.json", "a/1.mp4", "a10/x", "b.json"]
    assert store.list("a/") == ["a/1.json", "a/1.mp4"]
    assert store.exists("b.json") and not store.exists("c.json")
    store.delete("b.json")
    store.delete("b.json")
    assert not store.exists("b.json")
    with pytest.raises(ObjectNotFound, match=rf"^s3://{bucket}/runs/b.json: no such object$"):
        store.get("b.json")


def test_abort_leaves_no_upload_and_no_object(s3_server, bucket, store):
    w = store.open_writer("v.mp4")
    w.write(payload(6 * MIB))
    assert len(uploads(s3_server, bucket)) == 1
    w.abort()
    w.abort()
    assert uploads(s3_server, bucket) == [] and head(s3_server, bucket, "runs/v.mp4") == 404
    with pytest.raises(RuntimeError, match="encoder died"):
        with store.open_writer("v.mp4") as w:
            w.write(payload(6 * MIB))
            raise RuntimeError("encoder died")
    assert uploads(s3_server, bucket) == [] and store.list() == []


def test_endpoint_failing_mid_upload_leaves_nothing_once_it_recovers(s3_server, bucket, store):
    # The second part fails on all 3 attempts; the abort's first attempt fails too, its retry succeeds.
    endpoint = FailingEndpoint(store.client, "UploadPart", after=1, failures=4)
    w = store.open_writer("v.mp4")
    w.write(payload(5 * MIB))
    with pytest.raises(StorageError) as info:
        w.write(payload(5 * MIB))
    assert str(info.value).startswith(f"s3://{bucket}/runs/v.mp4: upload failed: InternalError")
    assert "\n" not in str(info.value) and w.state == "aborted"
    assert endpoint.attempts.count("UploadPart") == 1 + 3  # max_attempts = 3 counts every try
    assert endpoint.attempts[-2:] == ["AbortMultipartUpload"] * 2
    assert uploads(s3_server, bucket) == [] and head(s3_server, bucket, "runs/v.mp4") == 404


def test_failed_complete_aborts(s3_server, bucket, store):
    FailingEndpoint(store.client, "CompleteMultipartUpload", failures=3)
    with pytest.raises(StorageError, match="completing the upload failed: InternalError"):
        with store.open_writer("v.mp4") as w:
            w.write(payload(6 * MIB))
            w.commit()
    assert uploads(s3_server, bucket) == [] and head(s3_server, bucket, "runs/v.mp4") == 404


def test_outage_through_the_abort_is_reported_and_swept_after_recovery(s3_server, bucket, store):
    FailingEndpoint(store.client, "UploadPart", after=1, failures=6)  # upload and abort both fail
    w = store.open_writer("v.mp4")
    with pytest.raises(StorageError, match=r"upload failed: InternalError.*could not abort multipart upload "
                                           r".*abort_incomplete\(\)"):
        w.write(payload(10 * MIB))
    assert len(uploads(s3_server, bucket)) == 1  # the orphan the message warns about
    assert store.abort_incomplete() == ["v.mp4"]  # the endpoint has recovered
    assert uploads(s3_server, bucket) == [] and head(s3_server, bucket, "runs/v.mp4") == 404


def test_access_denied_and_missing_bucket_are_one_line(s3_server, store):
    FailingEndpoint(store.client, "PutObject", status=403, code="AccessDenied", message="Access Denied")
    with pytest.raises(StorageError, match=rf"^{store.root}/v.json: upload failed: access denied \(AccessDenied\)$"):
        store.put("v.json", b"{}")
    missing = S3Store("no-such-bucket-here", "p", endpoint_url=s3_server.endpoint_url, max_attempts=1)
    with pytest.raises(StorageError, match=r"^s3://no-such-bucket-here/p/v.json: upload failed: "
                                           r"bucket 'no-such-bucket-here' does not exist$"):
        missing.put("v.json", b"{}")
    with pytest.raises(StorageError, match=r"bucket 'no-such-bucket-here' does not exist$"):
        missing.list()


def test_credentials_never_shown(s3_server, store):
    store.put("v.json", b"{}")  # the client has resolved its credentials by now
    w = store.open_writer("w.bin")
    shown = [repr(store), str(store), repr(w), pickle.dumps(store)]
    missing = S3Store("no-such-bucket-here", endpoint_url=s3_server.endpoint_url, max_attempts=1)
    for call in (lambda: missing.put("v.json", b"{}"), lambda: missing.get("v.json"),
                 lambda: store.get("nope"), lambda: missing.open_writer("x").write(payload(8 * MIB))):
        with pytest.raises(StorageError) as info:
            call()
        shown.append(str(info.value))
    text = " ".join(s if isinstance(s, str) else s.decode("latin-1") for s in shown)
    assert TEST_ACCESS_KEY not in text and TEST_SECRET_KEY not in text
    assert pickle.loads(pickle.dumps(store)).get("v.json") == b"{}"  # rebuilt client, same store
    w.abort()


def test_endpoint_userinfo_is_not_shown():
    store = S3Store("bucket-name", endpoint_url="http://user:hunter2@127.0.0.1:9000")
    assert "hunter2" not in repr(store) and "127.0.0.1:9000" in repr(store)


def test_part_size_below_the_s3_minimum_is_refused():
    with pytest.raises(ValueError, match=r"storage.s3.part_size_mib: must be >= 5 \(got 4\)"):
        S3Store("bucket-name", part_size_mib=4)
