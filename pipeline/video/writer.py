"""VideoWriter: latent blocks in, a playable MP4 and its JSON in the object store out.

The plain class behind the Writer actor. Per block: causal VAE decode (StreamingDecoder) ->
fragmented-MP4 encode (FragmentedMP4Encoder) -> bytes streamed into `store.open_writer(name.mp4)`
as fragments complete (on S3, multipart parts upload as they fill). `finish` commits the MP4 and
then writes `name.json`; `abort` (or any failure) leaves neither behind.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass

import torch

from pipeline.storage.base import ObjectStore, ObjectWriter
from pipeline.video.decode import StreamingDecoder
from pipeline.video.encode import FragmentedMP4Encoder


DECODE_CHUNK = 1  # latent frames decoded per chunk handed to the encoder (4 pixel frames after the first)


@dataclass
class Timings:
    decode_s: float = 0.0
    encode_s: float = 0.0  # PyAV/x264, without the time spent handing bytes to the store
    upload_s: float = 0.0  # inside store writes (file writes, or S3 part uploads as they fill)

    def add(self, other: Timings) -> None:
        self.decode_s += other.decode_s
        self.encode_s += other.encode_s
        self.upload_s += other.upload_s


@dataclass
class BlockReport:
    frames: int  # pixel frames this block decoded to
    bytes_out: int  # MP4 bytes handed to the store so far (whole video)
    timings: Timings


class _TimedSink:
    """The encoder's sink: forwards to the object writer and times it."""

    def __init__(self, writer: ObjectWriter):
        self.writer = writer
        self.seconds = 0.0

    def write(self, data: bytes) -> None:
        t0 = time.perf_counter()
        self.writer.write(data)
        self.seconds += time.perf_counter() - t0


class VideoWriter:
    """One video: write_block(latents) per block in order, then finish(metadata) or abort()."""

    def __init__(self, store: ObjectStore, name: str, vae, fps: int, output, gop: int | None = None):
        """`output` has codec, crf, preset (OutputConfig); `gop` defaults to fps (1 s fragments)."""
        self.store, self.name, self.fps, self.output, self.gop = store, name, fps, output, gop
        self.key, self.json_key = f"{name}.mp4", f"{name}.json"
        self.decoder = StreamingDecoder(vae)
        self.timings = Timings()
        self.block_frames: list[int] = []  # pixel frames per block written
        self.state = "open"  # open -> finished | aborted
        self._object = store.open_writer(self.key)
        self._sink = _TimedSink(self._object)
        self._encoder: FragmentedMP4Encoder | None = None  # made on the first block: size from the VAE
        self._encoded = 0  # pixel frames handed to the encoder

    @property
    def frames(self) -> int:
        return sum(self.block_frames)

    def write_block(self, latents: torch.Tensor) -> BlockReport:
        """latents (1, C, T_b, h, w) of the next block, as the sampler produced them.

        Decoded DECODE_CHUNK latent frames at a time; each chunk's frames are encoded on a second
        thread while the next chunk decodes (x264 and the GPU's decode overlap; at most one chunk
        waits), so a block costs about max(decode, encode) rather than their sum."""
        self._check_open()
        frames_before, upload_before = self.frames, self._sink.seconds
        block = Timings()
        pending: Future | None = None
        try:
            # leaving the pool waits for its encode, so abort() below never races the encode thread
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"encode-{self.name}") as pool:
                t0 = time.perf_counter()
                for frames in self.decoder.frame_chunks(latents, DECODE_CHUNK):
                    block.decode_s += time.perf_counter() - t0
                    if self._encoder is None:
                        self._encoder = FragmentedMP4Encoder(
                            self._sink, self.fps, width=frames.shape[2], height=frames.shape[1],
                            codec=self.output.codec, crf=self.output.crf, preset=self.output.preset, gop=self.gop)
                    if pending is not None:
                        block.encode_s += pending.result()
                    pending = pool.submit(self._encode, frames)
                    t0 = time.perf_counter()
                if pending is not None:
                    block.encode_s += pending.result()
        except BaseException:
            self.abort()
            raise
        block.upload_s = self._sink.seconds - upload_before
        block.encode_s -= block.upload_s  # the sink's writes happen inside encoding
        self.timings.add(block)
        self.block_frames.append(self._encoded - frames_before)
        return BlockReport(frames=self.block_frames[-1], bytes_out=self._encoder.bytes_written, timings=block)

    def _encode(self, frames) -> float:
        """On the encode thread: frames into the encoder; returns the seconds it took."""
        t0 = time.perf_counter()
        self._encoder.add_frames(frames)
        self._encoded += len(frames)
        return time.perf_counter() - t0

    def finish(self, metadata: dict) -> dict:
        """Flush and commit the MP4, then put name.json = metadata + {"mp4": what the writer knows}.
        Returns that JSON's content. Nothing is left behind if any step fails."""
        self._check_open()
        if "mp4" in metadata:
            raise ValueError("metadata: key 'mp4' is the writer's own (got it in the metadata)")
        try:
            if self._encoder is None:
                raise ValueError(f"{self.store.uri(self.key)}: no blocks were written")
            json.dumps(metadata)  # a metadata value JSON cannot hold fails here, before anything is published
            t0 = time.perf_counter()
            upload_before = self._sink.seconds
            self._encoder.close()
            upload = self._sink.seconds - upload_before
            self.timings.add(Timings(encode_s=time.perf_counter() - t0 - upload, upload_s=upload))
            t0 = time.perf_counter()
            self._object.commit()
            self.timings.upload_s += time.perf_counter() - t0
        except BaseException:
            self.abort()
            raise
        record = {**metadata, "mp4": self._facts()}
        try:
            self.store.put(self.json_key, json.dumps(record, indent=2).encode())
        except BaseException:
            self.store.delete(self.key)  # an MP4 without its JSON would look like a finished video
            self.state = "aborted"
            raise
        self.state = "finished"
        return record

    def abort(self) -> None:
        """Drop the video: nothing of it stays in the store. Idempotent."""
        if self.state != "open":
            return
        self.state = "aborted"
        try:
            if self._encoder is not None:
                self._encoder.abort()
        finally:
            self._object.abort()

    def _facts(self) -> dict:
        enc = self._encoder
        return {
            "uri": self.store.uri(self.key),
            "json_uri": self.store.uri(self.json_key),
            "frames": self.frames,
            "fps": self.fps,
            "duration_s": self.frames / self.fps,
            "width": enc.width,
            "height": enc.height,
            "bytes": enc.bytes_written,
            "codec": self.output.codec,
            "crf": self.output.crf,
            "preset": self.output.preset,
            "gop": enc.gop,
            "block_frames": list(self.block_frames),
            "latent_frames": self.decoder.latent_frames,
            "timings": asdict(self.timings),
        }

    def _check_open(self) -> None:
        if self.state != "open":
            raise RuntimeError(f"{self.store.uri(self.key)}: writer is {self.state}")

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.state == "open":
            self.abort()
