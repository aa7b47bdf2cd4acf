"""Fragmented MP4 from PyAV: decodes back to the planned frames, streams fragment by fragment."""

import io
import math
import struct

import av
import numpy as np
import pytest

from pipeline.video.encode import FragmentedMP4Encoder

W, H, FPS = 64, 48, 8


class Recorder:
    """A sink with only write(), as the encoder promises to need."""

    def __init__(self):
        self.data = bytearray()
        self.writes = 0

    def write(self, b: bytes) -> None:
        self.data += b
        self.writes += 1


def moving_gradient(n: int, start: int = 0) -> np.ndarray:
    """(n, H, W, 3) uint8: smooth, so the codec's error stays small and no scene cut appears."""
    t = np.arange(start, start + n)[:, None, None]
    y, x = np.mgrid[0:H, 0:W]
    r = (x[None] * 3 + t * 4) % 256
    g = (y[None] * 4 + t * 2) % 256
    b = np.broadcast_to((x[None] + y[None] + t) % 256, r.shape)
    return np.stack([r, g, b], -1).astype(np.uint8)


def top_level_boxes(data: bytes) -> list[tuple[int, str]]:
    """(offset, type) of each top-level ISO-BMFF box."""
    out, offset = [], 0
    while offset + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[offset:offset + 8])
        out.append((offset, kind.decode("latin-1")))
        offset += size
    return out


def decode(data: bytes):
    with av.open(io.BytesIO(bytes(data))) as c:
        s = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(s)]
        return np.stack(frames), s.average_rate, s.codec_context.width, s.codec_context.height


def test_round_trip_frames_size_fps_and_fragments():
    sink = Recorder()
    enc = FragmentedMP4Encoder(sink, FPS, W, H, preset="ultrafast")
    blocks = [9, 16, 16]  # as a video of 1 + 2 + 4 + 4 latent frames would decode
    start = 0
    for n in blocks:
        enc.add_frames(moving_gradient(n, start))
        start += n
    enc.close()
    frames, rate, width, height = decode(sink.data)
    assert frames.shape == (sum(blocks), H, W, 3) and enc.frames == sum(blocks)
    assert (width, height, rate) == (W, H, FPS)
    # Content survives (yuv420p + CRF 18 on a smooth picture): mean error of a few levels at most.
    assert np.abs(frames.astype(int) - moving_gradient(sum(blocks)).astype(int)).mean() < 4
    kinds = [k for _, k in top_level_boxes(sink.data)]
    assert kinds[:2] == ["ftyp", "moov"]
    assert kinds.count("moof") >= math.ceil(sum(blocks) / enc.gop) == 6  # GOP = fps: a fragment a second
    assert enc.bytes_written == len(sink.data) and sink.writes > 1


def test_a_prefix_of_whole_fragments_already_plays():
    sink = Recorder()
    enc = FragmentedMP4Encoder(sink, FPS, W, H, preset="ultrafast")
    enc.add_frames(moving_gradient(40))
    before_close = bytes(sink.data)  # what an upload would already hold mid-video
    enc.close()
    moofs = [o for o, k in top_level_boxes(sink.data) if k == "moof"]
    frames, *_ = decode(sink.data[:moofs[2]])  # header + the first two fragments
    assert len(frames) == 2 * enc.gop
    frames, *_ = decode(before_close)
    assert len(frames) >= enc.gop and sink.data.startswith(before_close)


def test_bytes_stream_before_close_with_the_default_preset():
    """x264 medium looks ahead up to 40 frames; fragments still leave before close."""
    sink = Recorder()
    enc = FragmentedMP4Encoder(sink, FPS, W, H)  # preset medium, as OutputConfig's default
    enc.add_frames(moving_gradient(64))
    assert "moof" in [k for _, k in top_level_boxes(sink.data)]
    enc.close()
    assert len(decode(sink.data)[0]) == 64


def test_abort_writes_nothing_more():
    sink = Recorder()
    enc = FragmentedMP4Encoder(sink, FPS, W, H, preset="ultrafast")
    enc.add_frames(moving_gradient(4))
    written = len(sink.data)
    enc.abort()
    assert len(sink.data) == written
    with pytest.raises(RuntimeError, match="closed"):
        enc.add_frames(moving_gradient(1))


@pytest.mark.parametrize("args, message", [
    (dict(width=63, height=48), r"video size: yuv420p needs even width and height \(got 63x48\)"),
    (dict(width=64, height=48, codec="mpeg4"), r"output.codec: must be one of libx264, libx265 \(got 'mpeg4'\)"),
])
def test_bad_settings_are_one_line(args, message):
    with pytest.raises(ValueError, match=message):
        FragmentedMP4Encoder(Recorder(), FPS, **args)


def test_wrong_frames_are_refused():
    enc = FragmentedMP4Encoder(Recorder(), FPS, W, H, preset="ultrafast")
    with pytest.raises(ValueError, match=r"frames: expected \(F, 48, 64, 3\) uint8, got \(2, 48, 64, 3\) float32"):
        enc.add_frames(np.zeros((2, H, W, 3), np.float32))
    enc.abort()
