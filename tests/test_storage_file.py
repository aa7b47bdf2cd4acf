"""file:// store: atomic commit (temp name + rename), abort leaves nothing, list/exists/get/delete."""

import os

import pytest

from pipeline.config import StorageConfig
from pipeline.storage import FileStore, ObjectNotFound, S3Store, StorageError, open_store


@pytest.fixture
def store(tmp_path):
    return FileStore(tmp_path / "out")


def all_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_put_get_exists_list_delete(store):
    assert store.list() == [] and not store.exists("a.json")
    assert store.put("a.json", b"{}") == f"file://{store.directory}/a.json"
    store.put("run1/v.mp4", b"\x00" * 10)
    store.put("run1/v.json", b"[]")
    store.put("run10/v.mp4", b"x")
    assert store.get("run1/v.mp4") == b"\x00" * 10 and store.exists("run1/v.json")
    assert store.list() == ["a.json", "run1/v.json", "run1/v.mp4", "run10/v.mp4"]
    assert store.list("run1/") == ["run1/v.json", "run1/v.mp4"]
    assert store.list("run1") == ["run1/v.json", "run1/v.mp4", "run10/v.mp4"]
    store.delete("run1/v.mp4")
    store.delete("run1/v.mp4")  # missing: not an error
    assert not store.exists("run1/v.mp4") and store.list("run1/") == ["run1/v.json"]


def test_writer_commits_atomically(store):
    w = store.open_writer("clips/v.mp4")
    w.write(b"first ")
    w.write(memoryview(b"second"))
    # Mid-write: the final name does not exist and listings do not show the temporary.
    assert not store.exists("clips/v.mp4") and store.list() == []
    assert len(all_files(store.directory)) == 1
    assert w.commit() == store.uri("clips/v.mp4")
    assert store.get("clips/v.mp4") == b"first second" and w.bytes_written == 12
    assert all_files(store.directory) == ["clips/v.mp4"]
    with pytest.raises(StorageError, match="writer is committed"):
        w.write(b"more")


def test_commit_replaces_an_existing_object_whole(store):
    store.put("v.mp4", b"old")
    with store.open_writer("v.mp4") as w:
        w.write(b"new")
        assert store.get("v.mp4") == b"old"
        w.commit()
    assert store.get("v.mp4") == b"new"


def test_abort_and_exceptions_leave_nothing(store):
    w = store.open_writer("v.mp4")
    w.write(b"partial")
    w.abort()
    w.abort()  # idempotent
    assert all_files(store.directory) == []
    with pytest.raises(RuntimeError, match="boom"):
        with store.open_writer("v.mp4") as w:
            w.write(b"partial")
            raise RuntimeError("boom")
    with store.open_writer("v2.mp4") as w:  # leaving without commit also aborts
        w.write(b"partial")
    assert w.state == "aborted" and all_files(store.directory) == []


def test_missing_object_is_one_line_naming_the_uri(store):
    with pytest.raises(ObjectNotFound, match=rf"^file://{store.directory}/nope.json: no such object$"):
        store.get("nope.json")


@pytest.mark.parametrize("key", ["", "/abs.mp4", "../up.mp4", "a/../b", "a//b", "a/./b", "dir/", "a\\b"])
def test_bad_keys_are_refused(store, key):
    with pytest.raises(ValueError, match="object key: must be a relative path"):
        store.open_writer(key)
    assert not store.directory.exists()


def test_unwritable_directory_is_one_line(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    store = FileStore(tmp_path / "file")  # a file where the directory should be
    with pytest.raises(StorageError, match=r"^file://.*/file/v.mp4: cannot create in .*: File exists$"):
        store.put("v.mp4", b"x")


def test_relative_directory_is_taken_from_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = open_store(StorageConfig(uri="file://outputs"))
    assert isinstance(store, FileStore) and store.directory == tmp_path / "outputs"
    assert open_store(StorageConfig(uri=f"file://{tmp_path}/abs")).directory == tmp_path / "abs"
    store.put("v.json", b"{}")
    assert (tmp_path / "outputs" / "v.json").read_bytes() == b"{}"


def test_open_store_picks_by_scheme():
    s3 = open_store(StorageConfig(uri="s3://bucket-name/runs/a"))
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == ("bucket-name", "runs/a")
    assert s3.uri("v.mp4") == "s3://bucket-name/runs/a/v.mp4"
    with pytest.raises(ValueError, match=r"storage.uri: must start with file:// or s3:// \(got 'gs://x'\)"):
        open_store(StorageConfig(uri="gs://x"))
    with pytest.raises(ValueError, match="storage.uri: file:// needs a directory"):
        open_store(StorageConfig(uri="file://"))
