"""Flow-matching schedulers from diffusers, built from the sampling config.

flow_euler: FlowMatchEulerDiscreteScheduler with sigma shift `shift` (SD3 / SANA style).
unipc: UniPCMultistepScheduler in flow-prediction mode with flow sigmas, Wan's own sampler
(its released scheduler_config: flow_shift 3.0 at 480p, 5.0 at 720p).
Both are stateful over a block's steps: build one per block.
"""

from __future__ import annotations


def make_scheduler(sampling_cfg):
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if sampling_cfg.scheduler == "flow_euler":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=sampling_cfg.shift)
    if sampling_cfg.scheduler == "unipc":
        return UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                       use_flow_sigmas=True, flow_shift=sampling_cfg.shift)
    raise ValueError(f"sampling.scheduler: unknown {sampling_cfg.scheduler!r} (known: flow_euler, unipc)")
