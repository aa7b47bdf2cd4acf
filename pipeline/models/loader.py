"""Load a model family's components from a directory or hub id in diffusers layout.

Layout (what diffusers' save_pretrained writes and what Wan/SANA-Video checkpoints ship):
    transformer/  vae/  text_encoder/  tokenizer/   [+ transformer/longreel_routers.safetensors]
Random-weight presets (model.path empty) are built once from model.architecture with a fixed
seed, saved in that same layout under model.cache_dir, and then loaded from there: users' weights
and test weights go through one code path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

ROUTERS_FILE = "longreel_routers.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelBundle:
    """Everything one rank needs to denoise and decode a video."""

    family: str  # wan | sana
    path: str  # where the components were loaded from
    transformer: nn.Module  # diffusers WanTransformer3DModel / SanaVideoTransformer3DModel
    vae: nn.Module  # diffusers AutoencoderKLWan
    text_encoder: nn.Module  # transformers UMT5EncoderModel / Gemma2Model
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    routers_state: dict | None = None  # MoGA router weights shipped with the transformer, if any


def _classes(family: str):
    import transformers
    from diffusers import AutoencoderKLWan, SanaVideoTransformer3DModel, WanTransformer3DModel

    if family == "wan":
        return WanTransformer3DModel, AutoencoderKLWan, transformers.UMT5EncoderModel, transformers.UMT5Config
    if family == "sana":
        return SanaVideoTransformer3DModel, AutoencoderKLWan, transformers.Gemma2Model, transformers.Gemma2Config
    raise ValueError(f"model.family: unknown family {family!r} (known: wan, sana)")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---------------------------------------------------------------------------------------------
# Random-weight presets: build once, save in diffusers layout, load like real weights
# ---------------------------------------------------------------------------------------------


def _architecture(model_cfg) -> dict:
    from omegaconf import DictConfig, OmegaConf

    arch = model_cfg.architecture
    return OmegaConf.to_container(arch, resolve=True) if isinstance(arch, DictConfig) else dict(arch)


def _cache_key(model_cfg) -> str:
    import diffusers
    import transformers

    arch = _architecture(model_cfg)
    blob = json.dumps({"family": model_cfg.family, "architecture": arch, "diffusers": diffusers.__version__,
                       "transformers": transformers.__version__.split(".")[0]}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def build_random(model_cfg) -> Path:
    """Directory holding model.architecture with seeded random weights (built on first use)."""
    arch = _architecture(model_cfg)
    root = Path(os.path.expanduser(model_cfg.cache_dir))
    target = root / f"{model_cfg.preset}-{_cache_key(model_cfg)}"
    if (target / "model_index.json").is_file():
        return target
    _quiet()
    root.mkdir(parents=True, exist_ok=True)
    transformer_cls, vae_cls, text_cls, text_config_cls = _classes(model_cfg.family)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            transformer_cls(**arch["transformer"]).save_pretrained(tmp / "transformer")
            vae_cls(**arch["vae"]).save_pretrained(tmp / "vae")
            text_cls(text_config_cls(**arch["text_encoder"])).save_pretrained(tmp / "text_encoder")
        from transformers import ByT5Tokenizer

        ByT5Tokenizer().save_pretrained(tmp / "tokenizer")  # byte-level: no vocabulary to download
        (tmp / "model_index.json").write_text(json.dumps({"family": model_cfg.family, "random_weights": True,
                                                          "preset": model_cfg.preset}))
        try:
            os.rename(tmp, target)  # atomic; another process may have won the race
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------
# The one loader
# ---------------------------------------------------------------------------------------------


def _quiet() -> None:
    """Loading is reported by longreel's own progress; the libraries' per-file bars are noise in logs."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def load_model(model_cfg, device: torch.device | str | None = None) -> ModelBundle:
    """Load transformer, VAE, text encoder and tokenizer (model.path, or the random-weight cache)."""
    from transformers import AutoTokenizer

    _quiet()
    device = resolve_device(model_cfg.device) if device is None else torch.device(device)
    dtype, vae_dtype = DTYPES[model_cfg.dtype], DTYPES[model_cfg.vae_dtype]
    source = str(build_random(model_cfg)) if not model_cfg.path else model_cfg.path
    local = Path(os.path.expanduser(source))
    where = str(local) if local.is_dir() else source  # a hub id otherwise
    kw = {"revision": model_cfg.revision} if model_cfg.revision and not local.is_dir() else {}
    transformer_cls, vae_cls, text_cls, _ = _classes(model_cfg.family)
    try:
        transformer = transformer_cls.from_pretrained(where, subfolder="transformer", torch_dtype=dtype, **kw)
        vae = vae_cls.from_pretrained(where, subfolder="vae", torch_dtype=vae_dtype, **kw)
        text_encoder = text_cls.from_pretrained(where, subfolder="text_encoder", torch_dtype=dtype, **kw)
        tokenizer = AutoTokenizer.from_pretrained(where, subfolder="tokenizer", **kw)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"model.path: cannot load {model_cfg.family} weights from {source!r}: {first}") from None
    routers = None
    routers_file = local / "transformer" / ROUTERS_FILE
    if local.is_dir() and routers_file.is_file():
        from safetensors.torch import load_file

        routers = load_file(str(routers_file))
    for module in (transformer, vae, text_encoder):
        module.to(device).eval().requires_grad_(False)
    return ModelBundle(model_cfg.family, source, transformer, vae, text_encoder, tokenizer, device, dtype, routers)
