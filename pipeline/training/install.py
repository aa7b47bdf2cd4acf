"""Install a training run's weights.tar into the package (pipeline/models/weights/<preset>/).

The device writes transformer/, vae/ (first twin only), text_encoder/ and model_index.json per
twin; here, where transformers is installed, each directory gets its tokenizer/ (ByT5, byte-level:
no vocabulary file), the other twins get vae -> ../<first twin>/vae (one VAE on disk), and every
directory is loaded through pipeline.models.load_model, the loader users' weights go through,
before it replaces what was installed.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "models" / "weights"


def _safe_members(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    members = tar.getmembers()
    for m in members:
        if not (m.isfile() or m.isdir()) or m.name.startswith("/") or ".." in Path(m.name).parts:
            raise ValueError(f"weights.tar: unexpected entry {m.name!r}")
    return members


def install_weights(source: Path, dest: Path = WEIGHTS_DIR) -> list[str]:
    """Unpack `source` (weights.tar or a run directory holding it), complete, check, install.
    Returns one line per installed model directory."""
    from omegaconf import OmegaConf
    from transformers import ByT5Tokenizer

    from pipeline.config import ModelConfig
    from pipeline.models import load_model

    tar_path = source / "weights.tar" if source.is_dir() else source
    if not tar_path.is_file():
        raise FileNotFoundError(f"{tar_path}: weights.tar not found")
    dest.mkdir(parents=True, exist_ok=True)
    lines = []
    with tempfile.TemporaryDirectory(dir=dest, prefix=".install-") as tmp:
        staging = Path(tmp)
        with tarfile.open(tar_path) as tar:
            tar.extractall(staging, members=_safe_members(tar))
        models = sorted(p.parent for p in staging.glob("*/model_index.json"))
        if not models:
            raise ValueError(f"{tar_path}: no model directory (…/model_index.json) inside")
        for model in models:
            training = json.loads((model / "model_index.json").read_text())["longreel_training"]
            ByT5Tokenizer().save_pretrained(model / "tokenizer")
            if not (model / "vae").exists():
                os.symlink(Path("..") / training["vae_from"] / "vae", model / "vae")
        for model in models:  # the loader must take every one of them, as it takes users' weights
            cfg = OmegaConf.structured(ModelConfig(path=str(model), preset=model.name))
            bundle = load_model(cfg, "cpu")
            size = sum(f.stat().st_size for f in model.rglob("*") if f.is_file() and not f.is_symlink()
                       and not any(p.is_symlink() for p in f.relative_to(model).parents if p != Path(".")))
            training = json.loads((model / "model_index.json").read_text())["longreel_training"]
            lines.append(f"{model.name}: {training['attention']}, {training['steps']} steps, "
                         f"{sum(p.numel() for p in bundle.transformer.parameters()) / 1e6:.2f}M transformer "
                         f"parameters, {size / 2**20:.1f} MiB")
        for model in models:
            target = dest / model.name
            old = dest / f".old-{model.name}"
            if target.exists():
                os.replace(target, old)
            os.replace(model, target)
            shutil.rmtree(old, ignore_errors=True)
    return [f"installed {dest / line}" for line in lines]
