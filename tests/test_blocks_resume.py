"""Pipeline.generate in block mode: a video interrupted after block k and generated again resumes from
the checkpoint (blocks 0..k are not denoised again) and decodes to the same frames as an
uninterrupted one; the checkpoint is gone once the video is finished."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch

from pipeline.config import CONFIG_DIR
from pipeline.sampling.denoise import Denoiser

DEMO = str(CONFIG_DIR / "examples" / "demo.yaml")
SMALL = ["video.height=48", "video.width=48", "video.fps=4", "sampling.steps=2", "output.preset=ultrafast",
         "sampling.mode=block", "sampling.block_frames=1", "model=tiny-sana", "attention=linear"]
SHOTS = [{"prompt": "a red circle", "seconds": 2}, {"prompt": "a blue square", "seconds": 1.5}]  # 3 + 2 latent frames


class Interrupted(Exception):
    pass


def frames(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])


@pytest.fixture(scope="module")
def pipe(model_cache, tmp_path_factory):
    from pipeline import Pipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is faster on a shared 2-core machine
    out = tmp_path_factory.mktemp("out")
    yield Pipeline.from_config(DEMO, [*SMALL, f"model.cache_dir={model_cache}", f"storage.uri=file://{out}"]), out
    torch.set_num_threads(threads)


def test_an_interrupted_video_resumes_bit_identically(pipe, monkeypatch):
    pipeline, out = pipe
    ref = pipeline.generate({"name": "ref", "shots": SHOTS, "seed": 7}, progress=False)
    assert ref.frames == 1 + 4 * 4 and list(out.glob("ref.ckpt/*")) == []  # checkpoints cleared when done

    denoised = []
    original = Denoiser.denoise_block

    def stop_at_block_3(self, plan, block, *args, **kwargs):
        if block.index == 3:
            raise Interrupted(f"stopped before block {block.index}")
        denoised.append(block.index)
        return original(self, plan, block, *args, **kwargs)

    monkeypatch.setattr(Denoiser, "denoise_block", stop_at_block_3)
    with pytest.raises(Interrupted):
        pipeline.generate({"name": "cut", "shots": SHOTS, "seed": 7}, progress=False)
    assert denoised == [0, 1, 2] and not (out / "cut.mp4").exists()
    assert (out / "cut.ckpt" / "progress.json").is_file()

    def count(self, plan, block, *args, **kwargs):
        denoised.append(block.index)
        return original(self, plan, block, *args, **kwargs)

    monkeypatch.setattr(Denoiser, "denoise_block", count)
    denoised.clear()
    cut = pipeline.generate({"name": "cut", "shots": SHOTS, "seed": 7}, progress=False)
    assert denoised == [3, 4]  # blocks 0..2 came from the checkpoint
    assert cut.frames == ref.frames
    assert np.array_equal(frames(out / "cut.mp4"), frames(out / "ref.mp4"))
    assert list((out / "cut.ckpt").glob("*")) == []

    denoised.clear()  # a fresh run of the same video with another seed differs (the check can fail)
    other = pipeline.generate({"name": "other", "shots": SHOTS, "seed": 8}, progress=False)
    assert denoised == [0, 1, 2, 3, 4] and other.frames == ref.frames
    assert not np.array_equal(frames(out / "other.mp4"), frames(out / "ref.mp4"))
