"""Batches end to end on a real local Ray cluster (CPU workers, gloo, the tiny Wan model):
3 videos over 2 worker groups of P=2 -> 3 playable MP4s and the results manifest, although a worker
was killed mid-video (its group is rebuilt and the frames equal an undisturbed twin's); a second
run skips them all; an S3 endpoint that starts failing -> the video fails, no upload is left."""

import json
import threading
import time

import av
import numpy as np
import pytest

import jobs.generate as generate
from pipeline.layout import pixel_frames, shot_latent_frames
from pipeline.runtime.results import parse_results
from tests.failing_s3 import FailingS3Proxy
from tests.ray_local import local_ray

# 32x32 pixels (2x2 tokens a frame), 8 fps, 2 steps: a video takes a fraction of a second to denoise.
TINY = ["video.height=32", "video.width=32", "video.fps=8", "sampling.steps=2", "output.preset=ultrafast",
        "cluster.gpus_per_worker=0", "cluster.cpus_per_worker=0.5", "cluster.resource_timeout_s=120"]


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    return local_ray()


@pytest.fixture
def tiny(model_cache):
    """TINY with the session's cache of random-weight models."""
    return [*TINY, f"model.cache_dir={model_cache}"]


def write_manifest(path, entries):
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return str(path)


def shots(*seconds):
    return [{"prompt": f"shot {i}: a red ball rolls", "seconds": s} for i, s in enumerate(seconds)]


def decode(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return np.stack(frames), float(stream.average_rate)


def kill_a_worker_while(ray, video: str, out, driver: threading.Thread) -> str:
    """Once `video` has a finished block, kill rank 1 of the group denoising it; returns the group."""
    while not (out / f"{video}.ckpt" / "progress.json").exists():
        assert driver.is_alive(), f"the job ended before {video} finished a block"
        time.sleep(0.01)
    for group in ("g0", "g1"):
        try:
            videos = ray.get(ray.get_actor(f"{group}-scheduler").progress.remote())
        except ValueError:
            continue  # no such group
        if any(p.name == video and p.phase in ("denoising", "starting") for p in videos):
            ray.kill(ray.get_actor(f"{group}-build1-worker1"), no_restart=True)
            return group
    raise AssertionError(f"{video} was not being denoised by any group")


def test_three_videos_over_two_groups_a_killed_worker_and_a_rerun_that_skips_them(ray_cluster, tiny, tmp_path):
    # "ref" and "hit" differ only in name; a worker of the group denoising "hit" is killed after its
    # first block, so "hit" must come out identical to the undisturbed "ref". A block per shot, 6 blocks
    # of 8 steps: the kill lands while blocks are left to denoise.
    out = tmp_path / "out"
    twin = {"shots": shots(1, 1, 1, 1, 1, 1), "seed": 3, "overrides": {"sampling.mode": "block", "sampling.steps": 8}}
    seconds = {"ref": (1,) * 6, "other": (1.5, 0.5), "hit": (1,) * 6}
    manifest = write_manifest(tmp_path / "batch.jsonl", [{"name": "ref", **twin},
                                                         {"name": "other", "shots": shots(1.5, 0.5), "seed": 1},
                                                         {"name": "hit", **twin}])
    args = [manifest, *tiny, "parallel.degree=2", "cluster.groups=2", f"storage.uri=file://{out}"]
    rc = []
    driver = threading.Thread(target=lambda: rc.append(generate.main(args)))
    driver.start()
    hit_group = kill_a_worker_while(ray_cluster, "hit", out, driver)
    driver.join(timeout=300)
    assert rc == [0]

    results = parse_results((out / "batch.results.jsonl").read_bytes())
    assert [(r.name, r.status, r.line) for r in results] == [("ref", "done", 1), ("other", "done", 2), ("hit", "done", 3)]
    ref, other, hit = results
    assert (ref.rebuilds, hit.rebuilds, hit.group) == (0, 1, hit_group)
    assert hit.blocks == 6 and json.loads((out / "hit.json").read_text())["rebuilds"] == 1
    for r in results:
        frames, fps = decode(out / f"{r.name}.mp4")
        expected = pixel_frames(sum(shot_latent_frames(list(seconds[r.name]), 8)))
        assert frames.shape == (expected, 32, 32, 3) and fps == 8 and r.frames == expected
        meta = json.loads((out / f"{r.name}.json").read_text())
        assert meta["mp4"]["frames"] == expected and meta["seed"] == (1 if r.name == "other" else 3)
        assert r.video_uri == f"file://{out}/{r.name}.mp4" and 0 < r.timings.denoise_s <= r.timings.wall_s
    assert np.array_equal(decode(out / "ref.mp4")[0], decode(out / "hit.mp4")[0])
    assert not list(out.glob("*.ckpt/*")) and not list(out.glob(".*partial"))  # checkpoints dropped when done

    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.mp4")}
    t0 = time.perf_counter()
    assert generate.main(args) == 0
    assert time.perf_counter() - t0 < 10  # no worker group is started for a batch with nothing to do
    again = parse_results((out / "batch.results.jsonl").read_bytes())
    assert [(r.name, r.status) for r in again] == [("ref", "skipped"), ("other", "skipped"), ("hit", "skipped")]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.mp4")} == mtimes


def test_an_s3_endpoint_that_starts_failing_leaves_no_upload(ray_cluster, s3_server, tiny, tmp_path):
    # S3 parts are >= 5 MiB: lossless 256x256 frames of the random model fill the first part after about
    # 4M pixels (a block per shot); the endpoint fails that part and every retry of it.
    bucket = s3_server.create_bucket()
    big = ["video.height=256", "video.width=256", "output.crf=0", "sampling.mode=block", "storage.s3.part_size_mib=5"]
    manifest = write_manifest(tmp_path / "s3.jsonl", [{"name": "v", "shots": shots(3, 3, 3), "seed": 1}])
    with FailingS3Proxy(s3_server.endpoint_url, failing="UploadPart", fail_from=1) as proxy:
        store = [f"storage.uri=s3://{bucket}/runs", f"storage.s3.endpoint_url={proxy.endpoint_url}",
                 "storage.s3.max_attempts=2"]
        assert generate.main([manifest, *tiny, *big, "parallel.degree=1", *store]) == 1
        assert proxy.failed == 2 and proxy.seen.count("CreateMultipartUpload") == 1
        assert "AbortMultipartUpload" in proxy.seen
    client = s3_server.client()
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert "runs/v.mp4" not in keys and "runs/v.json" not in keys
    (result,) = parse_results(client.get_object(Bucket=bucket, Key="runs/s3.results.jsonl")["Body"].read())
    assert result.status == "failed" and result.error.startswith("StorageError: s3://") and "InternalError" in result.error
