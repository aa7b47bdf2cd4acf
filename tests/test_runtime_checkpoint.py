"""Block checkpoints: what was saved comes back bit for bit, progress.json is the commit point, a
checkpoint from another config is dropped, and nothing stays once the video is done."""

import pytest
import torch

from pipeline.config import S3Config, StorageConfig, load_config
from pipeline.runtime.checkpoint import BlockCheckpoint, fingerprint
from pipeline.runtime.progress import Progress, ProgressDisplay
from pipeline.runtime.results import Timings, VideoResult, parse_results, results_jsonl
from pipeline.storage import FileStore, ObjectNotFound, open_store


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    if request.param == "file":
        return FileStore(tmp_path)
    s3 = request.getfixturevalue("s3_server")
    bucket = s3.create_bucket()
    return open_store(StorageConfig(uri=f"s3://{bucket}/runs", s3=S3Config(endpoint_url=s3.endpoint_url,
                                                                             region="us-east-1")))


def _blocks(n):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, 16, 2, 4, 4, generator=g) for _ in range(n)]


def test_saved_blocks_and_latest_state_come_back_exactly(store):
    cfg = load_config(None, ["video.seed=5", "parallel.degree=2"])
    ckpt = BlockCheckpoint(store, "v", cfg)
    assert ckpt.load() is None
    blocks = _blocks(3)
    g = torch.Generator().manual_seed(1)
    states = [[{"layer.0.linear.S": torch.randn(2, 4, 4, generator=g)} for _ in range(2)] for _ in range(3)]
    ckpt.save(0, blocks[0], states[0])  # the in-process way: states handed over with the block
    for k in (1, 2):  # the worker way: each rank saves its own state, then the block is committed
        for rank in (0, 1):
            ckpt.save_state(k, rank, states[k][rank])
        ckpt.save(k, blocks[k])
    # a block written but not committed by progress.json (the job died in between) does not count
    store.put("v.ckpt/block-00003.safetensors", b"partial")
    saved = BlockCheckpoint(store, "v", cfg).load()
    assert saved.blocks_done == 3 and saved.ranks == 2
    assert all(torch.equal(a, b) for a, b in zip(saved.latents, blocks))
    assert all(torch.equal(saved.state[r]["layer.0.linear.S"], states[2][r]["layer.0.linear.S"]) for r in (0, 1))
    assert sorted(k for k in store.list("v.ckpt/") if "state" in k) == [  # older states go
        "v.ckpt/state-00002-rank0.safetensors", "v.ckpt/state-00002-rank1.safetensors"]
    with pytest.raises(ObjectNotFound):
        ckpt.load_state(1, 0)

    ckpt.clear()
    assert store.list("v.ckpt/") == []


def test_a_checkpoint_from_another_config_is_dropped(store):
    cfg = load_config(None, ["video.seed=5"])
    BlockCheckpoint(store, "v", cfg).save(0, _blocks(1)[0], [{}])
    assert BlockCheckpoint(store, "v", load_config(None, ["video.seed=6"])).load() is None
    assert store.list("v.ckpt/") == []


def test_fingerprint_ignores_what_does_not_change_latents():
    a = load_config(None, ["video.name=a"])
    assert fingerprint(a) == fingerprint(load_config(None, ["video.name=b", "storage.uri=s3://other-bkt/x",
                                                             "output.crf=30", "cluster.groups=3"]))
    assert fingerprint(a) != fingerprint(load_config(None, ["sampling.steps=7"]))
    assert fingerprint(a) != fingerprint(load_config(None, ["video.shots.0.prompt=another"]))


def test_results_round_trip_and_plain_progress_lines(tmp_path):
    results = [VideoResult("a", "done", line=1, video_uri="file:///x/a.mp4", timings=Timings(wall_s=2.0, denoise_s=1.5)),
               VideoResult("b", "failed", line=2, error="StorageError: s3://b/v.mp4: upload failed")]
    assert parse_results(results_jsonl(results)) == results

    log = tmp_path / "log.txt"
    with open(log, "w") as stream:
        display = ProgressDisplay(stream, rich=False)
        for p in [Progress("a", "denoising", block=0, blocks=2, steps=4, step=1),
                  Progress("a", "denoising", block=0, blocks=2, steps=4, step=3),  # same block: no new line
                  Progress("a", "denoising", block=1, blocks=2, steps=4, tokens_per_s=1234.5, eta_s=3.2),
                  Progress("a", "done", block=2, blocks=2, steps=4)]:
            display.update(p)
        display.close()
    assert log.read_text().splitlines() == [
        "a: denoising | block 1/2 | step 1/4",
        "a: denoising | block 2/2 | step 0/4 | 1,234 tok/s | ETA 3s",
        "a: done | block 2/2",
    ]
