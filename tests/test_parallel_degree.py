"""parallel.degree against the model's attention heads: Ulysses shards heads over ranks, so a degree
that does not divide them stops at config time when model.architecture names the heads, and when the
model is parallelized otherwise; parallel.ring (dense layers) and linear attention (state exchange)
lift the rule, and the runtime worker passes parallel.ring through to parallelize."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.parallel import ParallelContext, ParallelDiT
from pipeline.parallel.ring import RingAttention
from pipeline.parallel.ulysses import UlyssesAttention
from pipeline.runtime.worker import Worker


@pytest.mark.parametrize("overrides, heads, hint", [
    (["parallel.degree=3"], 4, "use one of 1, 2, 4 or parallel.ring=true)"),
    (["parallel.degree=8", "model=tiny-trained"], 4, "use one of 1, 2, 4 or parallel.ring=true)"),
    (["parallel.degree=3", "attention=moga"], 4, "use one of 1, 2, 4)"),
    (["parallel.degree=3", "attention=moga", "parallel.ring=true"], 4, "use one of 1, 2, 4)"),  # ring: dense only
    (["parallel.degree=3", "model=tiny-sana", "attention=linear", "attention.dense_layers=[0]"], 4, "1, 2, 4)"),
])
def test_degree_not_dividing_known_heads_is_one_config_line(overrides, heads, hint):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model=tiny-wan", *overrides])
    degree = int(overrides[0].split("=")[1])
    message = str(e.value)
    assert message.startswith(f"parallel.degree: must divide the model's {heads} attention heads (Ulysses ")
    assert message.endswith(f"{hint} (got {degree})")
    assert e.value.key == "parallel.degree" and e.value.value == degree and "\n" not in message


@pytest.mark.parametrize("overrides", [
    ["parallel.degree=2"],
    ["parallel.degree=4", "attention=moga+stga"],
    ["parallel.degree=3", "parallel.ring=true"],  # ring attention for the dense layers
    ["parallel.degree=3", "attention=moga", "attention.dense_layers=[0, 1]", "parallel.ring=true"],  # all dense
    ["parallel.degree=3", "model=tiny-sana", "attention=linear"],  # linear attention exchanges states, not heads
    ["parallel.degree=5", "model=wan2.1-t2v-1.3b"],  # heads known to the weights only: checked by parallelize
])
def test_degrees_that_can_run_pass(overrides):
    assert load_config(None, ["model=tiny-wan", *overrides]).parallel.degree == int(overrides[0].split("=")[1])


def _worker(model_cache: str, world: int, *overrides: str) -> Worker:
    """A rank's Worker whose context claims `world` ranks (parallelize only wraps; nothing communicates)."""
    worker = Worker(load_config(None, [f"model.cache_dir={model_cache}", "model=tiny-wan", *overrides]))
    worker.ctx = ParallelContext(0, world, None, torch.device("cpu"))
    return worker


def test_worker_passes_parallel_ring_to_parallelize(model_cache):
    worker = _worker(model_cache, 3, "parallel.degree=3", "parallel.ring=true")
    worker.load_model()
    assert isinstance(worker.run_model, ParallelDiT)
    assert worker.adapter.attention and all(isinstance(fn, RingAttention) for fn in worker.adapter.attention)

    worker = _worker(model_cache, 2, "parallel.degree=2", "parallel.ring=true")  # heads divide: Ulysses
    worker.load_model()
    assert all(isinstance(fn, UlyssesAttention) for fn in worker.adapter.attention)


def test_heads_only_the_weights_know_are_checked_when_parallelized(model_cache):
    worker = _worker(model_cache, 3, "parallel.degree=1")  # as if the config could not see the heads
    with pytest.raises(ValueError, match=r"^parallel\.degree: 3 does not divide the 4 attention heads \(Ulysses "
                                         r"shards heads over ranks; use one of 1, 2, 4\)$"):
        worker.load_model()
