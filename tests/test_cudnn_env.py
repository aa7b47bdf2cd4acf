"""TORCH_CUDNN_SDPA_AVOID_RECOMPILE: which methods want it, and that the Ray workers, the local
Pipeline and the parallel benchmark get it before any cuDNN work, a user's own value always kept."""

import pytest
from omegaconf import OmegaConf

from pipeline.attention import method_names
from pipeline.attention.cudnn_env import AVOID_RECOMPILE, avoid_recompile_wanted, use_avoid_recompile
from pipeline.config import AttentionConfig, load_config

# Per registered method: do its cuDNN SDPA calls take lengths that follow the data? (a new method
# must be added here, with its answer)
WANTED = {"dense": False, "moga": True, "stga": False, "moga+stga": True, "moc": False, "lite": False,
          "linear": False}


def attention(method: str):
    return OmegaConf.merge(OmegaConf.structured(AttentionConfig), {"method": method})


@pytest.fixture
def env(monkeypatch):
    """The variable unset for the test (and whatever the code sets removed afterwards)."""
    monkeypatch.delenv(AVOID_RECOMPILE, raising=False)
    return monkeypatch


def test_wanted_for_the_routed_methods_only():
    assert sorted(WANTED) == method_names()
    assert {m: avoid_recompile_wanted(attention(m)) for m in method_names()} == WANTED


def test_use_in_this_process_only_on_cuda_and_never_over_a_user_value(env):
    import os

    assert not use_avoid_recompile(attention("moga+stga"), "cpu") and AVOID_RECOMPILE not in os.environ
    assert not use_avoid_recompile(attention("dense"), "cuda") and AVOID_RECOMPILE not in os.environ
    assert use_avoid_recompile(attention("moga+stga"), "cuda:1") and os.environ[AVOID_RECOMPILE] == "1"
    env.setenv(AVOID_RECOMPILE, "0")
    assert not use_avoid_recompile(attention("moga"), "cuda") and os.environ[AVOID_RECOMPILE] == "0"


@pytest.mark.parametrize("method, device, user, expected", [
    ("moga+stga", "cuda:0", None, "1"),
    ("moga", "cuda:1", None, "1"),
    ("moga+stga", "cuda:0", "0", "0"),  # the job's (or the cluster's) value is kept
    ("dense", "cuda:0", None, None),
    ("stga", "cuda:0", None, None),
    ("moga+stga", "cpu", None, None),  # CPU workers: no cuDNN
])
def test_a_ray_worker_sets_it_when_it_takes_its_device(env, method, device, user, expected):
    """Worker.set_device, which the WorkerGroup calls before anything builds a model on the rank."""
    import os

    import pipeline.runtime.worker as worker_module

    if user is not None:
        env.setenv(AVOID_RECOMPILE, user)
    env.setattr(worker_module, "select_device", lambda visible, index: device)  # CUDA itself is not touched
    cfg = load_config(None, [f"attention={method}"])
    visible = None if device == "cpu" else "0,1"  # what the WorkerGroup passes for CPU and GPU bundles
    assert worker_module.Worker(cfg).set_device(visible, 0) == device
    assert os.environ.get(AVOID_RECOMPILE) == expected


class _Built(Exception):
    pass


@pytest.mark.parametrize("method, user, expected", [("moga+stga", None, "1"), ("moga+stga", "0", "0"),
                                                    ("dense", None, None)])
def test_pipeline_sets_it_before_the_model_is_built(env, method, user, expected):
    import os

    import pipeline.models
    from pipeline.api import Pipeline

    if user is not None:
        env.setenv(AVOID_RECOMPILE, user)
    seen = []

    def load_model(model_cfg):
        seen.append(os.environ.get(AVOID_RECOMPILE))
        raise _Built  # the order is what is tested: nothing on CUDA is built here

    env.setattr(pipeline.models, "load_model", load_model)
    with pytest.raises(_Built):
        Pipeline(load_config(None, ["model.device=cuda", f"attention={method}"]))
    assert seen == [expected]


def test_pipeline_on_cpu_leaves_it_unset(env):
    import os

    import pipeline.models
    from pipeline.api import Pipeline

    env.setattr(pipeline.models, "load_model", lambda model_cfg: (_ for _ in ()).throw(_Built()))
    with pytest.raises(_Built):
        Pipeline(load_config(None, ["model.device=cpu", "attention=moga+stga"]))
    assert AVOID_RECOMPILE not in os.environ


def test_bench_parallel_sets_it_for_moga_and_says_so(env):
    import os

    from jobs.bench_parallel import cudnn_env, parse

    assert cudnn_env(parse(["--methods", "dense,moga+stga", "--device", "cpu"])) == f"{AVOID_RECOMPILE} unset"
    assert cudnn_env(parse(["--methods", "dense"])) == f"{AVOID_RECOMPILE} unset"
    line = cudnn_env(parse(["--methods", "dense,moga+stga"]))
    assert os.environ[AVOID_RECOMPILE] == "1"
    assert line.startswith(f"{AVOID_RECOMPILE}=1 (set for moga+stga;") and "dense" in line
    env.setenv(AVOID_RECOMPILE, "0")
    assert cudnn_env(parse(["--methods", "moga"])) == f"{AVOID_RECOMPILE}=0 (from the environment)"
