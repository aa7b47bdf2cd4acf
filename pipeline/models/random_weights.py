"""Random-weight models for presets without weights (model.path empty): built once, saved, reloaded.

Every component of model.architecture is built with a fixed seed and saved with save_pretrained in
diffusers layout (transformer/, vae/, text_encoder/, tokenizer/, model_index.json) under
model.cache_dir/<preset>-<hash of architecture and library versions>/. The loader then reads that
directory exactly as it reads a user's weights. The tokenizer is byte-level (ByT5's): it has no
vocabulary file, so nothing is downloaded, ever.

The directory appears atomically: it is written under a temporary name in the same parent and
renamed; when two processes race, the second rename fails, the loser drops its copy and both use
the winner's (identical: same seed, same code).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from pipeline.config import ConfigError

SEED = 0
# What each family's random build is made of: diffusers transformer, transformers text encoder
# (and its config class), the pipeline class model_index.json names. The VAE is the Wan VAE.
FAMILY_BUILD = {
    "wan": ("WanTransformer3DModel", "UMT5EncoderModel", "UMT5Config", "WanPipeline"),
    "sana": ("SanaVideoTransformer3DModel", "Gemma2Model", "Gemma2Config", "SanaVideoPipeline"),
}
VAE_CLASS = "AutoencoderKLWan"
TOKENIZER_CLASS = "ByT5Tokenizer"
COMPONENTS = ("transformer", "vae", "text_encoder")


def architecture(model_cfg) -> dict:
    """model.architecture as plain containers."""
    from omegaconf import DictConfig, OmegaConf

    arch = model_cfg.architecture
    return OmegaConf.to_container(arch, resolve=True) if isinstance(arch, DictConfig) else dict(arch)


def cache_key(model_cfg) -> str:
    """Short hash of what the weights depend on: family, architecture, seed, library versions."""
    import diffusers
    import transformers

    blob = json.dumps({"family": model_cfg.family, "architecture": architecture(model_cfg), "seed": SEED,
                       "torch": torch.__version__.split("+")[0], "diffusers": diffusers.__version__,
                       "transformers": transformers.__version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def cache_path(model_cfg) -> Path:
    return Path(os.path.expanduser(model_cfg.cache_dir)) / f"{model_cfg.preset}-{cache_key(model_cfg)}"


def build_components(model_cfg) -> dict:
    """transformer, vae, text_encoder (seeded random weights, fp32, CPU) and tokenizer, in memory."""
    import diffusers
    import transformers

    arch = architecture(model_cfg)
    missing = [c for c in COMPONENTS if c not in arch]
    if missing:
        raise ConfigError("model.architecture", sorted(arch), f"needs sections {', '.join(COMPONENTS)} "
                                                              f"(missing {', '.join(missing)})")
    transformer_name, text_name, text_config_name, _ = FAMILY_BUILD[model_cfg.family]
    text_config = getattr(transformers, text_config_name)(**arch["text_encoder"])
    try:
        with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is left as it was
            torch.manual_seed(SEED)
            parts = {
                "transformer": getattr(diffusers, transformer_name)(**arch["transformer"]),
                "vae": getattr(diffusers, VAE_CLASS)(**arch["vae"]),
                "text_encoder": getattr(transformers, text_name)(text_config),
            }
    except TypeError as e:  # an unknown constructor argument in the preset
        raise ConfigError("model.architecture", model_cfg.preset, str(e).splitlines()[0]) from None
    parts["tokenizer"] = getattr(transformers, TOKENIZER_CLASS)()
    return parts


def model_index(model_cfg) -> dict:
    """model_index.json in diffusers' format (library, class per component) plus our provenance."""
    import diffusers

    transformer_name, text_name, _, pipeline_name = FAMILY_BUILD[model_cfg.family]
    return {"_class_name": pipeline_name, "_diffusers_version": diffusers.__version__,
            "transformer": ["diffusers", transformer_name], "vae": ["diffusers", VAE_CLASS],
            "text_encoder": ["transformers", text_name], "tokenizer": ["transformers", TOKENIZER_CLASS],
            "_longreel": {"preset": model_cfg.preset, "random_weights": True, "seed": SEED,
                          "key": cache_key(model_cfg)}}


def publish(tmp: Path, target: Path) -> Path:
    """Rename the finished `tmp` to `target`; if another process got there first, keep theirs."""
    try:
        os.rename(tmp, target)
    except OSError:
        if not (target / "model_index.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def random_weights_dir(model_cfg) -> Path:
    """The directory holding model.architecture with seeded random weights (built on first use)."""
    target = cache_path(model_cfg)
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        for name, part in build_components(model_cfg).items():
            part.save_pretrained(tmp / name)
        # Written last: its presence marks a complete directory.
        (tmp / "model_index.json").write_text(json.dumps(model_index(model_cfg), indent=2) + "\n")
        return publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
