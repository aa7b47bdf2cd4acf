"""A batch job killed mid-video, then run again, resumes from the last finished block: the blocks
in the checkpoint are not denoised again and the video is identical to an uninterrupted one."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import jobs.generate as generate
from pipeline.runtime.results import parse_results
from tests.ray_local import NUM_CPUS, local_ray
from tests.test_ray_batch import TINY, decode, shots, write_manifest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    return local_ray()


def test_a_killed_job_resumes_from_its_last_finished_block(ray_cluster, model_cache, tmp_path):
    out = tmp_path / "out"
    video = {"shots": shots(1, 1, 1, 1, 1, 1), "seed": 4, "overrides": {"sampling.mode": "block", "sampling.steps": 8}}
    manifest = write_manifest(tmp_path / "twins.jsonl", [{"name": "ref", **video}, {"name": "cut", **video}])
    args = [manifest, *TINY, f"model.cache_dir={model_cache}", "parallel.degree=1", "cluster.groups=1", f"storage.uri=file://{out}"]
    # The first job is a separate driver process on the same cluster, killed like `ray job stop` would.
    address = ray_cluster.get_runtime_context().gcs_address
    job = subprocess.Popen([sys.executable, "-m", "jobs.generate", *args, f"cluster.address={address}"], cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ))
    progress = out / "cut.ckpt" / "progress.json"
    deadline = time.monotonic() + 180
    while not (progress.exists() and json.loads(progress.read_text())["blocks_done"] >= 2):
        assert job.poll() is None, job.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    job.kill()
    job.wait()
    # Ray ends a dead driver's actors and placement groups; until it has, the scheduler may finish one
    # more block (a run once resumed from 3 after reading 2 here), so the count is read afterwards.
    while ray_cluster.available_resources().get("CPU", 0) < NUM_CPUS:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    blocks_done = json.loads(progress.read_text())["blocks_done"]
    assert 2 <= blocks_done < 6 and not (out / "cut.mp4").exists()

    assert generate.main(args) == 0
    ref, cut = parse_results((out / "twins.results.jsonl").read_bytes())
    assert (ref.status, cut.status) == ("skipped", "done")
    assert cut.resumed_blocks == blocks_done and cut.blocks == 6
    assert json.loads((out / "cut.json").read_text())["resumed_blocks"] == blocks_done
    (ref_frames, _), (cut_frames, _) = decode(out / "ref.mp4"), decode(out / "cut.mp4")
    assert ref_frames.shape == cut_frames.shape and np.array_equal(ref_frames, cut_frames)
    assert list(out.glob("cut.ckpt/*")) == []
