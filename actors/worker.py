"""The worker actor: pipeline.runtime.worker.Worker plus what only Ray can tell it (its placement)."""

from __future__ import annotations

import os

import ray

from pipeline.runtime.worker import Placement, Worker


class RayWorker(Worker):
    """`ray.remote` is applied by the WorkerGroup, with the resources and bundle of each rank."""

    def placement(self) -> Placement:
        ctx = ray.get_runtime_context()
        return Placement(node_id=ctx.get_node_id(), node_ip=ray.util.get_node_ip_address(),
                         gpu_ids=tuple(str(g) for g in ctx.get_accelerator_ids().get("GPU", [])), pid=os.getpid())
