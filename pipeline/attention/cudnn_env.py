"""Whether a GPU process should ask torch for cuDNN SDPA plans that outlive a change of sequence length.

cuDNN builds an execution plan per exact attention shape and caches it per thread, without bound.
MoGA's per-group dense calls (and moga+stga's group and cell calls) take lengths that follow the
router, so they change every layer and every step: each call can build new plans. torch's opt-in
TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 plans for lengths rounded up to powers of two on a ragged path
(BSHD inputs without bias, which the per-segment slices are). Measured on an H100
(jobs/bench_attention.py, MoGA rerouted every call): 286 ms -> 50.6 ms at 150k tokens (50 ms with
fixed routing), 204 ms -> 4.19 ms at 32k. The same switch slows plain dense cuDNN SDPA at 150k
from 644 to 583 TFLOP/s, so it is on only for methods that declare `cudnn_shapes_follow_data`:
stga's windows and lite's tiles are fixed by the layout, and moc's gathered calls come in few
shapes (powers of two of items, key counts from a small set), built once and reused.

torch reads the variable once per process, at its first cuDNN SDPA call, so it must be in the
environment before then: a Ray worker sets it when it takes its device (Worker.set_device), the local
Pipeline before it builds the model. A value the user set, 0 included (the job's runtime_env, the
environment the cluster was started with), is kept.
"""

from __future__ import annotations

import os

import torch

from pipeline.attention import METHODS

AVOID_RECOMPILE = "TORCH_CUDNN_SDPA_AVOID_RECOMPILE"


def avoid_recompile_wanted(attention) -> bool:
    """Whether attention.method (an AttentionConfig's) runs cuDNN SDPA on shapes that follow the data."""
    return METHODS[attention.method].cudnn_shapes_follow_data


def use_avoid_recompile(attention, device: torch.device | str) -> bool:
    """In this process: set AVOID_RECOMPILE=1 when `device` is CUDA and the method wants it, unless it
    is set already. Call before the first cuDNN SDPA call. Returns whether it is "1" now."""
    if torch.device(device).type == "cuda" and avoid_recompile_wanted(attention):
        os.environ.setdefault(AVOID_RECOMPILE, "1")
    return os.environ.get(AVOID_RECOMPILE) == "1"
