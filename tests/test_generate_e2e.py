"""End to end: `longreel generate` on the tiny model writes a playable MP4 and its JSON, on file://
and on S3 (moto on 127.0.0.1); the Python API does the same; credentials never reach the JSON."""

import json
import os
import subprocess
import sys
from fractions import Fraction

import av
import pytest

from conftest import TEST_ACCESS_KEY, TEST_SECRET_KEY
from pipeline.config import CONFIG_DIR

DEMO = str(CONFIG_DIR / "examples" / "demo.yaml")
SMALL = ["video.height=64", "video.width=64", "sampling.steps=2"]


def _decode(path_or_file):
    with av.open(path_or_file) as c:
        s = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(s)]
        return frames, s.average_rate, (s.codec_context.width, s.codec_context.height)


def _check(mp4, meta):
    frames, rate, size = _decode(mp4)
    plan = meta["plan"]
    assert len(frames) == plan["pixel_frames"] == sum(plan["shot_pixel_frames"]) == 33
    assert size == (64, 64) and rate == Fraction(8)
    assert meta["video"]["shots"][1]["prompt"].startswith("the red circle bounces")
    assert meta["timings"]["denoise_s"] > 0


def _run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "generate", DEMO, *SMALL, *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_cli_generates_to_a_directory(tmp_path, model_cache):
    r = _run(f"storage.uri=file://{tmp_path}", f"model.cache_dir={model_cache}", "-q")
    assert r.returncode == 0, r.stderr
    assert f"video: file://{tmp_path}/demo.mp4" in r.stdout
    meta = json.loads((tmp_path / "demo.json").read_text())
    _check(str(tmp_path / "demo.mp4"), meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.json", "demo.mp4"]  # no temp files


def test_cli_generates_to_s3(tmp_path, s3_server, model_cache):
    bucket = s3_server.create_bucket()
    r = _run("storage=s3", f"storage.uri=s3://{bucket}/runs/a", f"storage.s3.endpoint_url={s3_server.endpoint_url}",
             f"model.cache_dir={model_cache}", "-q", env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    client = s3_server.client()
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"])
    assert keys == ["runs/a/demo.json", "runs/a/demo.mp4"]
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    body = client.get_object(Bucket=bucket, Key="runs/a/demo.json")["Body"].read().decode()
    assert TEST_ACCESS_KEY not in body and TEST_SECRET_KEY not in body
    assert TEST_ACCESS_KEY not in r.stdout + r.stderr and TEST_SECRET_KEY not in r.stdout + r.stderr
    mp4 = tmp_path / "demo.mp4"
    mp4.write_bytes(client.get_object(Bucket=bucket, Key="runs/a/demo.mp4")["Body"].read())
    _check(str(mp4), json.loads(body))


def test_python_api_generates_two_videos_with_one_model(tmp_path, model_cache):
    from pipeline import Pipeline

    pipe = Pipeline.from_config(DEMO, [*SMALL, f"storage.uri=file://{tmp_path}", f"model.cache_dir={model_cache}"])
    first = pipe.generate(progress=False)
    second = pipe.generate({"name": "other", "shots": [{"prompt": "a blue square", "seconds": 1}]}, progress=False)
    assert first.frames == 33 and second.frames == 9
    assert second.video_uri == f"file://{tmp_path}/other.mp4" and (tmp_path / "other.json").is_file()
    with pytest.raises(Exception, match="video.shots.0.seconds"):
        pipe.generate({"shots": [{"prompt": "a", "seconds": 0}]}, progress=False)
