"""VideoScheduler driven in-process, without Ray: a group of one real Worker (tiny Wan, block mode)
and the real BlockWriter. A worker lost mid-video is replaced by a fresh one that restores the
carried state from the checkpoint, and the video is identical to an undisturbed one; a video whose
writes fail comes out failed with its upload dropped and its checkpoint kept."""

import av
import numpy as np
import pytest
import torch

from pipeline.config import build_config, load_config, to_dict
from pipeline.runtime.scheduler import BlockOutput, VideoScheduler
from pipeline.runtime.worker import Worker, WorkerLost
from pipeline.runtime.writer import BlockWriter
from pipeline.sampling.plan import ShotPlan
from pipeline.storage import FileStore

SMALL = ["video.height=32", "video.width=32", "video.fps=8", "sampling.steps=2", "output.preset=ultrafast",
         "sampling.mode=block", "video.shots=[{prompt: a, seconds: 1}, {prompt: b, seconds: 1}, {prompt: c, seconds: 1}]"]


class Done:
    """A writer call carried out at once (in-process), with its result or its error."""

    def __init__(self, call, *args):
        try:
            self.value, self.error = call(*args), None
        except Exception as e:
            self.value, self.error = None, e

    def done(self) -> bool:
        return True

    def result(self):
        if self.error is not None:
            raise self.error
        return self.value


class LocalWriter:
    def __init__(self, writer: BlockWriter):
        self.writer = writer

    def open(self, cfg):
        return Done(self.writer.open, cfg)

    def write_block(self, latents):
        return Done(self.writer.write_block, latents)

    def finish(self, metadata):
        return Done(self.writer.finish, metadata)

    def abort(self, cfg):
        self.writer.abort(cfg.video.name)


class LocalGroup:
    """One Worker in this process. The first call for each block in `lose` finds its worker gone."""

    name = "local"

    def __init__(self, cfg, lose=()):
        self.cfg, self.lose, self.builds, self.calls = cfg, set(lose), 0, []
        self.rebuild()

    def rebuild(self):
        self.worker = Worker(self.cfg)  # starts as empty as a new process would
        self.worker.set_device(None, None)
        self.worker.join_group(None)
        self.worker.load_model()
        self.builds += 1

    def denoise_block(self, cfg, block, restore):
        self.calls.append((block, restore))
        if block in self.lose:
            self.lose.discard(block)
            raise WorkerLost(f"rank 0 died in block {block}")
        out = self.worker.denoise_block(cfg, block, restore)
        return BlockOutput(out.latents, out.seconds, out.state_s)

    def step_progress(self):
        return self.worker.step_progress()


def frames(path):
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])


@pytest.fixture(scope="module")
def setup(model_cache, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("out")
    cfg = load_config(None, [*SMALL, f"model.cache_dir={model_cache}", f"storage.uri=file://{out}"])
    writer = BlockWriter(cfg.model)
    writer.set_device(None, None)
    writer.load_vae()
    yield cfg, out, LocalWriter(writer)
    torch.set_num_threads(threads)


def video(cfg, name, storage=None):
    data = to_dict(cfg)
    data["video"]["name"] = name
    if storage is not None:
        data["storage"]["uri"] = storage
    return build_config(data)


def test_a_lost_worker_is_replaced_and_the_video_is_identical(setup):
    cfg, out, writer = setup
    store = FileStore(out)
    ref_cfg, hit_cfg = video(cfg, "ref"), video(cfg, "hit")
    ref = VideoScheduler(ref_cfg, ShotPlan.from_config(ref_cfg), LocalGroup(ref_cfg), writer).run()
    assert (ref.status, ref.blocks, ref.rebuilds) == ("done", 3, 0)

    group = LocalGroup(hit_cfg, lose={1})
    hit = VideoScheduler(hit_cfg, ShotPlan.from_config(hit_cfg), group, writer).run()
    assert (hit.status, hit.rebuilds, group.builds) == ("done", 1, 2)
    assert group.calls == [(0, True), (1, False), (1, True), (2, False)]  # block 1 again, state from block 0's
    assert np.array_equal(frames(out / "hit.mp4"), frames(out / "ref.mp4"))
    assert store.list("hit.ckpt/") == [] and hit.frames == ref.frames == 1 + 4 * (3 + 2 + 2 - 1)


def test_a_failing_writer_fails_the_video_and_keeps_its_checkpoint(setup, tmp_path):
    cfg, _, writer = setup
    bad = video(cfg, "bad", storage=f"file://{tmp_path}")
    (tmp_path / "bad.mp4").mkdir()  # the finished MP4 cannot be renamed onto a directory
    result = VideoScheduler(bad, ShotPlan.from_config(bad), LocalGroup(bad), writer).run()
    assert result.status == "failed" and "\n" not in result.error
    assert result.error.startswith(f"StorageError: file://{tmp_path}/bad.mp4: commit failed")
    assert FileStore(tmp_path).list("bad.ckpt/")[-1] == "bad.ckpt/progress.json"  # a rerun resumes from here
    assert not (tmp_path / "bad.json").exists() and not list(tmp_path.glob(".bad.mp4.*"))  # nothing half written
