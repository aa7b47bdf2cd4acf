"""Flow-matching schedulers from diffusers, built from sampling config (one per block: stateful)."""

from __future__ import annotations


def make_scheduler(sampling_cfg):
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if sampling_cfg.scheduler == "flow_euler":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=sampling_cfg.shift)
    if sampling_cfg.scheduler == "unipc":  # Wan's default sampler: UniPC in flow-prediction mode
        return UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                       use_flow_sigmas=True, flow_shift=sampling_cfg.shift)
    raise ValueError(f"sampling.scheduler: unknown {sampling_cfg.scheduler!r}")
