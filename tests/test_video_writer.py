"""VideoWriter end to end: latent blocks -> playable MP4 + JSON in the store (file:// and moto s3://);
abort or failure leaves nothing."""

import io
import json

import av
import numpy as np
import pytest
import torch
import yaml
from diffusers import AutoencoderKLWan

from conftest import TEST_ACCESS_KEY, TEST_SECRET_KEY
from pipeline.config import CONFIG_DIR, OutputConfig, S3Config, StorageConfig
from pipeline.storage import FileStore, StorageError, open_store
from pipeline.video.decode import StreamingDecoder
from pipeline.video.writer import VideoWriter

FPS = 8
BLOCKS = (3, 4)  # latent frames per block -> 9 + 16 = 25 pixel frames of 32 x 32
OUTPUT = OutputConfig(codec="libx264", crf=18, preset="ultrafast")


@pytest.fixture(scope="module")
def vae():
    arch = yaml.safe_load((CONFIG_DIR / "models" / "tiny-wan.yaml").read_text())["architecture"]["vae"]
    torch.manual_seed(0)
    return AutoencoderKLWan(**arch).eval()


@pytest.fixture(scope="module")
def latents():
    return torch.randn(1, 16, sum(BLOCKS), 4, 4, generator=torch.Generator().manual_seed(0))


def decode_mp4(data: bytes):
    with av.open(io.BytesIO(data)) as c:
        s = c.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(s)])
        return frames, s.average_rate


def luma(frames: np.ndarray) -> np.ndarray:
    return frames.astype(float) @ np.array([0.299, 0.587, 0.114])


def write_video(store, vae, latents, name="clip", metadata=None):
    writer = VideoWriter(store, name, vae, FPS, OUTPUT, gop=4)
    reports = [writer.write_block(block) for block in latents.split(list(BLOCKS), dim=2)]
    return writer, reports, writer.finish(metadata or {"seed": 7, "shots": ["a cat", "a dog"]})


def check_video(store, vae, latents, record, reports):
    frames, rate = decode_mp4(store.get("clip.mp4"))
    assert frames.shape == (25, 32, 32, 3) and rate == FPS
    assert [r.frames for r in reports] == [9, 16]
    # The pixels are the streamed decode's, through yuv420p + CRF 18. Random VAE weights make busy
    # pictures whose colour 4:2:0 blurs, so compare luma, frame by frame and in order.
    expected = StreamingDecoder(vae).decode(latents)
    error = np.abs(luma(frames) - luma(expected)).mean(axis=(1, 2))
    shifted = np.abs(luma(frames[1:]) - luma(expected[:-1])).mean(axis=(1, 2))
    assert error.max() < 6 and shifted.min() > 15  # measured: 3.4 and 24
    saved = json.loads(store.get("clip.json"))
    assert saved == record and saved["seed"] == 7 and saved["shots"] == ["a cat", "a dog"]
    mp4 = saved["mp4"]
    assert (mp4["frames"], mp4["fps"], mp4["width"], mp4["height"]) == (25, FPS, 32, 32)
    assert mp4["uri"] == store.uri("clip.mp4") and mp4["json_uri"] == store.uri("clip.json")
    assert mp4["bytes"] == len(store.get("clip.mp4")) and mp4["block_frames"] == [9, 16]
    assert mp4["latent_frames"] == 7 and mp4["duration_s"] == 25 / FPS
    assert set(mp4["timings"]) == {"decode_s", "encode_s", "upload_s"}
    assert all(v >= 0 for v in mp4["timings"].values()) and mp4["timings"]["decode_s"] > 0
    return saved


def test_file_store_end_to_end(tmp_path, vae, latents):
    store = FileStore(tmp_path)
    writer = VideoWriter(store, "clip", vae, FPS, OUTPUT, gop=4)
    reports = [writer.write_block(block) for block in latents.split(list(BLOCKS), dim=2)]
    # Bytes have streamed into the store's temporary file; the final name does not exist yet.
    [temp] = list(tmp_path.iterdir())
    assert temp.name.startswith(".clip.mp4.") and temp.stat().st_size == reports[-1].bytes_out > 0
    assert store.list() == []
    record = writer.finish({"seed": 7, "shots": ["a cat", "a dog"]})
    check_video(store, vae, latents, record, reports)
    assert store.list() == ["clip.json", "clip.mp4"]
    with pytest.raises(RuntimeError, match="writer is finished"):
        writer.write_block(latents)


def test_s3_end_to_end(s3_server, vae, latents):
    bucket = s3_server.create_bucket()
    store = open_store(StorageConfig(uri=f"s3://{bucket}/runs/r1", s3=S3Config(
        endpoint_url=s3_server.endpoint_url, region="us-east-1", part_size_mib=5)))
    _, reports, record = write_video(store, vae, latents)
    saved = check_video(store, vae, latents, record, reports)
    assert saved["mp4"]["uri"] == f"s3://{bucket}/runs/r1/clip.mp4"
    head = s3_server.client().head_object(Bucket=bucket, Key="runs/r1/clip.mp4")
    assert head["ContentType"] == "video/mp4"
    text = store.get("clip.json").decode()
    assert TEST_ACCESS_KEY not in text and TEST_SECRET_KEY not in text


def test_abort_leaves_nothing(s3_server, tmp_path, vae, latents):
    bucket = s3_server.create_bucket()
    stores = [FileStore(tmp_path), open_store(StorageConfig(uri=f"s3://{bucket}", s3=S3Config(
        endpoint_url=s3_server.endpoint_url, part_size_mib=5)))]
    for store in stores:
        writer = VideoWriter(store, "clip", vae, FPS, OUTPUT)
        writer.write_block(latents[:, :, :3])
        writer.abort()
        writer.abort()
        assert store.list() == []
    assert list(tmp_path.iterdir()) == []
    assert s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_failures_leave_nothing(tmp_path, vae, latents):
    store = FileStore(tmp_path)
    with pytest.raises(ValueError, match="latents: expected"):
        with VideoWriter(store, "clip", vae, FPS, OUTPUT) as writer:
            writer.write_block(latents[:, :, :3])
            writer.write_block(latents[:, :8])  # a wrong shape mid-video
    assert writer.state == "aborted" and list(tmp_path.iterdir()) == []

    writer = VideoWriter(store, "clip", vae, FPS, OUTPUT)
    writer.write_block(latents[:, :, :3])
    with pytest.raises(TypeError, match="not JSON serializable"):
        writer.finish({"config": object()})
    assert list(tmp_path.iterdir()) == []

    writer = VideoWriter(store, "clip", vae, FPS, OUTPUT)
    with pytest.raises(ValueError, match="no blocks were written"):
        writer.finish({})
    assert list(tmp_path.iterdir()) == []


def test_encode_failure_on_the_encode_thread_leaves_nothing(tmp_path, vae, latents, monkeypatch):
    """Chunks are encoded on a second thread: its failure reaches write_block and aborts the video."""
    from pipeline.video.encode import FragmentedMP4Encoder

    calls = []
    real = FragmentedMP4Encoder.add_frames

    def failing(self, frames):
        calls.append(len(frames))
        if len(calls) == 2:
            raise OSError("disk full")
        return real(self, frames)

    monkeypatch.setattr(FragmentedMP4Encoder, "add_frames", failing)
    with pytest.raises(OSError, match="disk full"):
        with VideoWriter(FileStore(tmp_path), "clip", vae, FPS, OUTPUT) as writer:
            writer.write_block(latents[:, :, :3])
    assert writer.state == "aborted" and list(tmp_path.iterdir()) == [] and calls == [1, 4]


def test_decode_failure_waits_for_the_pending_encode_then_leaves_nothing(tmp_path, vae, latents, monkeypatch):
    """A decode that fails while the previous chunk is still encoding on the second thread: the
    encode finishes before the abort closes the encoder under it, and nothing of the video stays."""
    import time

    from pipeline.video.encode import FragmentedMP4Encoder

    events = []
    real_add, real_abort, real_chunks = (FragmentedMP4Encoder.add_frames, FragmentedMP4Encoder.abort,
                                         StreamingDecoder.frame_chunks)

    def slow_add(self, frames):
        time.sleep(0.3)  # still encoding when the next decode fails
        real_add(self, frames)
        events.append(f"encoded {len(frames)}")

    def abort(self):
        events.append("encoder abort")
        real_abort(self)

    def failing_chunks(self, x, chunk):
        chunks = real_chunks(self, x, chunk)
        yield next(chunks)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(FragmentedMP4Encoder, "add_frames", slow_add)
    monkeypatch.setattr(FragmentedMP4Encoder, "abort", abort)
    monkeypatch.setattr(StreamingDecoder, "frame_chunks", failing_chunks)
    writer = VideoWriter(FileStore(tmp_path), "clip", vae, FPS, OUTPUT)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        writer.write_block(latents[:, :, :3])
    assert events == ["encoded 1", "encoder abort"]
    assert writer.state == "aborted" and list(tmp_path.iterdir()) == []


def test_json_failure_removes_the_mp4(tmp_path, vae, latents):
    store = FileStore(tmp_path)
    (tmp_path / "clip.json").mkdir()  # a directory where the JSON should go: its put fails
    writer = VideoWriter(store, "clip", vae, FPS, OUTPUT)
    writer.write_block(latents[:, :, :3])
    with pytest.raises(Exception, match="clip.json"):
        writer.finish({})
    assert store.list() == [] and writer.state == "aborted"


def test_missing_bucket_is_one_line_and_leaves_nothing(s3_server, vae, latents):
    store = open_store(StorageConfig(uri="s3://no-such-bucket-here/runs", s3=S3Config(
        endpoint_url=s3_server.endpoint_url, max_attempts=1)))
    writer = VideoWriter(store, "clip", vae, FPS, OUTPUT)
    writer.write_block(latents[:, :, :3])
    with pytest.raises(StorageError, match=r"^s3://no-such-bucket-here/runs/clip.mp4: upload failed: "
                                           r"bucket 'no-such-bucket-here' does not exist$"):
        writer.finish({})
    assert writer.state == "aborted"
