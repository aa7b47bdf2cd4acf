"""Load a model family's components from a local directory or a hub id in diffusers layout.

Layout (what save_pretrained writes and what the Wan / SANA-Video diffusers checkpoints ship):
    model_index.json  transformer/  vae/  text_encoder/  tokenizer/
    [transformer/longreel_routers.safetensors]   MoGA routers, when the weights were trained with them
model_index.json names each component's class; the family fixes the transformer class, the VAE must
be the Wan VAE (video decoding streams through its causal cache), the text encoder may be any
transformers class. Without model.path, random weights are built from model.architecture, saved
in this layout (random_weights.py) and loaded from there: one code path for every model.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.config import ConfigError

ROUTERS_FILE = "longreel_routers.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TRANSFORMERS = {"wan": "WanTransformer3DModel", "sana": "SanaVideoTransformer3DModel"}
DEFAULT_TEXT_ENCODERS = {"wan": "UMT5EncoderModel", "sana": "Gemma2Model"}
SUPPORTED_VAES = ("AutoencoderKLWan",)
PACKAGE_ROOT = Path(__file__).resolve().parent.parent.parent  # holds pipeline/: the repo, or site-packages


@dataclass
class ModelBundle:
    """Everything one rank needs to encode prompts, denoise and decode a video."""

    family: str  # wan | sana
    path: str  # where the components were loaded from (a directory or a hub id)
    transformer: nn.Module  # diffusers WanTransformer3DModel / SanaVideoTransformer3DModel
    vae: nn.Module  # diffusers AutoencoderKLWan
    text_encoder: nn.Module  # transformers UMT5EncoderModel / Gemma2Model (or what model_index.json names)
    tokenizer: object
    device: torch.device
    dtype: torch.dtype  # transformer and text encoder
    routers_state: dict[str, torch.Tensor] | None = None  # MoGA routers shipped with the weights
    text_instruction: str = ""  # prepended to prompts (not the negative prompt) before encoding


def resolve_device(name: str | torch.device) -> torch.device:
    """model.device: auto = the first CUDA device when there is one, else the CPU."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def shipped_path(path: str) -> str:
    """model.path, or PACKAGE_ROOT/path when it is a relative directory found only there: presets of the
    weights shipped with the package (pipeline/models/weights/...) name them relative to the repo, and
    must load from a wheel install or a Ray worker whatever its working directory. Hub ids pass."""
    if os.path.isabs(path) or path.startswith(("~", ".")) or os.path.exists(path):
        return path
    shipped = PACKAGE_ROOT / path
    return str(shipped) if shipped.is_dir() else path


def _is_local(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or os.path.exists(os.path.expanduser(source))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _quiet() -> None:
    """Per-file progress bars of the libraries are noise in job logs; longreel reports its own progress."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


# ---------------------------------------------------------------------------------------------
# 1. Which classes: model_index.json, checked against the family
# ---------------------------------------------------------------------------------------------


def read_model_index(source: str, revision: str = "") -> dict | None:
    """model_index.json of a directory or hub repository; None when it has none."""
    if _is_local(source):
        path = Path(os.path.expanduser(source)) / "model_index.json"
        return json.loads(path.read_text()) if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(source, "model_index.json", revision=revision or None)).read_text())
    except EntryNotFoundError:
        return None


def component_classes(family: str, index: dict | None) -> tuple[type, type, type]:
    """(transformer, vae, text encoder) classes for `family`, as model_index.json names them."""
    import diffusers
    import transformers

    def named(component: str, default: str) -> str:
        entry = (index or {}).get(component)
        return entry[1] if isinstance(entry, list) and len(entry) == 2 and entry[1] else default

    second = (index or {}).get("transformer_2")
    if isinstance(second, list) and any(second):
        raise ConfigError("model.path", "transformer_2", "two-expert Wan2.2 (A14B) weights are not supported")
    if (index or {}).get("expand_timesteps"):
        raise ConfigError("model.path", "expand_timesteps", "Wan2.2 TI2V (per-token timesteps) is not supported")
    transformer = named("transformer", TRANSFORMERS[family])
    if transformer != TRANSFORMERS[family]:
        raise ConfigError("model.family", family, f"the weights' transformer is {transformer}; family {family} "
                                                  f"needs {TRANSFORMERS[family]}")
    vae = named("vae", SUPPORTED_VAES[0])
    if vae not in SUPPORTED_VAES:
        raise ConfigError("model.path", vae, f"VAE class not supported (longreel decodes with "
                                             f"{', '.join(SUPPORTED_VAES)})")
    text = named("text_encoder", DEFAULT_TEXT_ENCODERS[family])
    if not hasattr(transformers, text):
        raise ConfigError("model.path", text, "text encoder class not found in transformers")
    return getattr(diffusers, transformer), getattr(diffusers, vae), getattr(transformers, text)


# ---------------------------------------------------------------------------------------------
# 2. The one loader
# ---------------------------------------------------------------------------------------------


def _routers(source: str, revision: str) -> dict[str, torch.Tensor] | None:
    """transformer/longreel_routers.safetensors when the weights ship one."""
    from safetensors.torch import load_file

    if _is_local(source):
        path = Path(os.path.expanduser(source)) / "transformer" / ROUTERS_FILE
        return load_file(str(path)) if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return load_file(hf_hub_download(source, f"transformer/{ROUTERS_FILE}", revision=revision or None))
    except EntryNotFoundError:
        return None


def _weights_location(model_cfg) -> tuple[str, str, dict]:
    """(source as configured or the random-weight cache, where to read it, hub kwargs)."""
    from pipeline.models.random_weights import random_weights_dir

    source = shipped_path(model_cfg.path) if model_cfg.path else str(random_weights_dir(model_cfg))
    local = _is_local(source)
    if local and not Path(os.path.expanduser(source)).is_dir():
        raise ConfigError("model.path", source, "no such directory (expected a directory in diffusers layout "
                                                "or a hub id like Wan-AI/Wan2.1-T2V-1.3B-Diffusers)")
    where = os.path.expanduser(source) if local else source
    return source, where, {} if local or not model_cfg.revision else {"revision": model_cfg.revision}


@contextlib.contextmanager
def _one_line_errors(model_cfg, source: str):
    """Missing files, bad repo ids, bad JSON -> one ConfigError naming model.path."""
    try:
        yield
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise ConfigError("model.path", source, f"cannot load {model_cfg.family} weights: {_first_line(e)}") from None


def load_model(model_cfg, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ModelBundle:
    """Transformer, VAE, text encoder and tokenizer of model.path (or of the random-weight cache).

    device: default model.device ("auto": CUDA when available); dtype: default model.dtype, for the
    transformer and the text encoder (the VAE uses model.vae_dtype). Weights are frozen (eval,
    no grad); MoGA routers found next to the transformer come back as routers_state."""
    from transformers import AutoTokenizer

    _quiet()
    device = resolve_device(model_cfg.device if device is None else device)
    dtype = DTYPES[model_cfg.dtype] if dtype is None else dtype
    source, where, hub = _weights_location(model_cfg)
    with _one_line_errors(model_cfg, source):
        index = read_model_index(where, model_cfg.revision)
        transformer_cls, vae_cls, text_cls = component_classes(model_cfg.family, index)
        transformer = transformer_cls.from_pretrained(where, subfolder="transformer", torch_dtype=dtype, **hub)
        vae = vae_cls.from_pretrained(where, subfolder="vae", torch_dtype=DTYPES[model_cfg.vae_dtype], **hub)
        text_encoder = text_cls.from_pretrained(where, subfolder="text_encoder", dtype=dtype, **hub)
        tokenizer = AutoTokenizer.from_pretrained(where, subfolder="tokenizer", **hub)
        routers = _routers(where, model_cfg.revision)
    for module in (transformer, vae, text_encoder):
        module.to(device).eval().requires_grad_(False)
    return ModelBundle(model_cfg.family, source, transformer, vae, text_encoder, tokenizer, device, dtype, routers,
                       model_cfg.text_instruction)


def load_vae(model_cfg, device: torch.device | str | None = None):
    """The VAE of the same weights alone, in model.vae_dtype (the writer's process decodes with it and
    need not read the transformer: at 1.3B that is ~5 GB read while the workers load theirs)."""
    _quiet()
    device = resolve_device(model_cfg.device if device is None else device)
    source, where, hub = _weights_location(model_cfg)
    with _one_line_errors(model_cfg, source):
        _, vae_cls, _ = component_classes(model_cfg.family, read_model_index(where, model_cfg.revision))
        vae = vae_cls.from_pretrained(where, subfolder="vae", torch_dtype=DTYPES[model_cfg.vae_dtype], **hub)
    return vae.to(device).eval().requires_grad_(False)
