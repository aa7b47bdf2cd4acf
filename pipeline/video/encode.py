"""Fragmented MP4 encoding with PyAV: uint8 frames in, MP4 bytes out to any `write(bytes)` sink.

movflags frag_keyframe+empty_moov+default_base_moof: the header (ftyp + an empty moov) comes
first, then one moof+mdat fragment per GOP. The muxer never seeks back, so the output can go
straight into an upload, and any prefix that ends on a fragment boundary is a playable video.

Fragment cadence: the muxer closes a fragment when the next keyframe arrives. The GOP defaults to
`fps` frames, so a fragment holds about one second of video (plus one at each scene cut, where x264
puts a keyframe: shot boundaries start a fragment). Bytes therefore reach the sink about one GOP
plus the encoder's lookahead (x264: up to 40 frames at preset medium) after the frames went in;
`close()` flushes the rest.
"""

from __future__ import annotations

import io
from fractions import Fraction
from typing import Protocol

import av
import numpy as np

MOVFLAGS = "frag_keyframe+empty_moov+default_base_moof"
# Codecs that take the CRF and preset of OutputConfig; others would silently ignore them.
CRF_CODECS = ("libx264", "libx265")


class Sink(Protocol):
    def write(self, data: bytes) -> object: ...


class _AppendOnly(io.RawIOBase):
    """What PyAV writes to: forwards bytes to the sink, counts them, refuses to seek."""

    def __init__(self, sink: Sink):
        self.sink = sink
        self.bytes_written = 0
        self.discard = False  # set on abort: what the muxer still writes while closing goes nowhere

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self.bytes_written

    def write(self, data) -> int:
        n = len(data)
        if not self.discard:
            self.sink.write(bytes(data))
            self.bytes_written += n
        return n


class FragmentedMP4Encoder:
    """add_frames(frames (F, H, W, 3) uint8) ... close(): H.264 yuv420p fragmented MP4 into `sink`."""

    def __init__(self, sink: Sink, fps: int | Fraction, width: int, height: int, codec: str = "libx264",
                 crf: int = 18, preset: str = "medium", gop: int | None = None):
        if codec not in CRF_CODECS:
            raise ValueError(f"output.codec: must be one of {', '.join(CRF_CODECS)} (got {codec!r})")
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ValueError(f"video size: yuv420p needs even width and height (got {width}x{height})")
        self.fps = Fraction(fps)
        self.width, self.height = width, height
        self.gop = gop or max(1, round(self.fps))  # one fragment per second of video
        self.frames = 0
        self._out = _AppendOnly(sink)
        self._container = av.open(self._out, mode="w", format="mp4", options={"movflags": MOVFLAGS})
        self._stream = self._container.add_stream(codec, rate=self.fps)
        self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, "yuv420p"
        self._stream.codec_context.options = {"crf": str(crf), "preset": preset, "g": str(self.gop)}
        self._closed = False

    @property
    def bytes_written(self) -> int:
        return self._out.bytes_written

    def add_frames(self, frames: np.ndarray) -> None:
        """frames (F, H, W, 3) uint8 RGB; fragments that complete are written to the sink."""
        if self._closed:
            raise RuntimeError("encoder is closed")
        if frames.dtype != np.uint8 or frames.shape[1:] != (self.height, self.width, 3):
            raise ValueError(f"frames: expected (F, {self.height}, {self.width}, 3) uint8, "
                             f"got {tuple(frames.shape)} {frames.dtype}")
        for rgb in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts, frame.time_base = self.frames, 1 / self.fps
            self._container.mux(self._stream.encode(frame))
            self.frames += 1

    def close(self) -> None:
        """Flush the encoder and the last fragment into the sink."""
        if self._closed:
            return
        self._closed = True
        self._container.mux(self._stream.encode(None))
        self._container.close()

    def abort(self) -> None:
        """Release the encoder; nothing more reaches the sink."""
        if self._closed:
            return
        self._closed = True
        self._out.discard = True
        self._container.close()
