"""One local Ray cluster per test session, shared by every test module that needs one.

Modules take it through a fixture that calls `local_ray`; the first call starts the cluster, later
calls reuse it; it stops at exit. Workers inherit the environment at start, so S3
credentials (the s3_server fixture) must be set before: fixtures ask for s3_server first."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# 2 cores here: fractional CPUs (0.5 per worker) let 2 groups of P=2, their writers and schedulers fit.
NUM_CPUS = 4


def _stop(temp_dir: str) -> None:
    import ray

    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


def local_ray():
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token file written to ~/.ray
        temp_dir = tempfile.mkdtemp(prefix="longreel-ray-")
        atexit.register(_stop, temp_dir)
        ray.init(num_cpus=NUM_CPUS, include_dashboard=False, log_to_driver=False, _temp_dir=temp_dir)
    return ray
