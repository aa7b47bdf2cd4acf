"""Submitting batches to a real Ray head started with `ray start --head` on this machine: the
`ray job submit` CLI runs a 1-video manifest end to end; pipeline.api.submit and `longreel submit`
of the same manifest return a Job with status, logs and results (the finished video is skipped).

The head is this test's own: its temp dir and every port are fresh, and it is stopped by ending the
`ray start --block` process that started it (never `ray stop`, which would stop other clusters)."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline import cli
from pipeline.api import submit
from tests.test_ray_batch import TINY, decode, shots, write_manifest

VENV_BIN = Path(sys.executable).parent
PORTS = ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
         "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port", "node-manager-port",
         "object-manager-port")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head():
    from ray.job_submission import JobSubmissionClient

    temp_dir = tempfile.mkdtemp(prefix="longreel-head-")
    ports = {name: free_port() for name in PORTS}
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}"}
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--dashboard-host", "127.0.0.1", "--include-dashboard", "true", "--num-cpus", "4",
           "--temp-dir", temp_dir, "--disable-usage-stats", *[x for k, v in ports.items() for x in (f"--{k}", str(v))]]
    log = open(Path(temp_dir) / "ray-start.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    deadline = time.monotonic() + 90
    while True:
        try:
            JobSubmissionClient(address).list_jobs()
            break
        except Exception:
            assert proc.poll() is None and time.monotonic() < deadline, (Path(temp_dir) / "ray-start.log").read_text()
            time.sleep(0.5)
    try:
        yield address, env
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops every process it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        subprocess.run(["rm", "-rf", temp_dir], check=False)


def test_ray_job_submit_then_submit_and_longreel_submit(head, model_cache, tmp_path, capsys):
    address, env = head
    workdir, out = tmp_path / "work", tmp_path / "out"
    workdir.mkdir()
    manifest = write_manifest(workdir / "one.jsonl", [{"name": "solo", "shots": shots(1, 0.5), "seed": 2}])
    overrides = [*TINY, f"model.cache_dir={model_cache}", "parallel.degree=1", f"storage.uri=file://{out}"]
    # 1. The real `ray job submit` CLI runs the manifest end to end on the head.
    run = subprocess.run([str(VENV_BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(workdir),
                          "--", "python", "-m", "jobs.generate", "one.jsonl", *overrides],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "succeeded" in run.stdout + run.stderr
    frames, fps = decode(out / "solo.mp4")
    assert frames.shape[1:] == (32, 32, 3) and fps == 8
    (line,) = (out / "one.results.jsonl").read_text().splitlines()
    assert json.loads(line)["status"] == "done"

    # 2. pipeline.api.submit: a Job with status, logs and results (the video is there: skipped).
    job = submit(manifest, overrides=overrides, address=address, wait=False)
    assert job.status() in ("PENDING", "RUNNING", "SUCCEEDED")
    assert job.wait(timeout_s=300) == "SUCCEEDED"
    (result,) = job.results()
    assert (result.name, result.status, result.video_uri) == ("solo", "skipped", f"file://{out}/solo.mp4")
    assert f"results: file://{out}/one.results.jsonl" in job.logs()

    # 3. `longreel submit`: validated here, run there, its log copied to stdout until it ends.
    capsys.readouterr()
    assert cli.main(["submit", manifest, *overrides, "--address", address]) == 0
    assert "skipped  solo" in capsys.readouterr().out


def test_submit_rejects_a_bad_manifest_before_submitting(head, tmp_path):
    address, _ = head
    manifest = write_manifest(tmp_path / "bad.jsonl", [{"name": "x", "shots": shots(0)}])
    with pytest.raises(ValueError, match=r"^bad.jsonl:1: video.shots.0.seconds: must be > 0"):
        submit(manifest, overrides=TINY, address=address)
    from ray.job_submission import JobSubmissionClient

    assert all((j.metadata or {}).get("manifest") != "bad.jsonl" for j in JobSubmissionClient(address).list_jobs())
