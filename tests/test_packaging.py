"""The wheel carries what runs need besides code: every preset, example and manifest under configs/,
and everything under pipeline/models/weights/ (a symlinked directory copied, as wheels hold no links);
installed from it, configs load and a preset's shipped weights resolve whatever the working directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = Path("pipeline/models/weights")


def _fake_shipped_weights(src: Path) -> set[str]:
    """Two model directories as training/install.py lays them out (the second's vae/ a link to the
    first's); returns the files a wheel must hold for them."""
    files = {}
    for name in ("tiny-trained", "tiny-trained-moga"):
        model = src / WEIGHTS / name
        files[model / "model_index.json"] = "{}"
        for component in ("transformer", "text_encoder"):
            files[model / component / "config.json"] = "{}"
            files[model / component / "diffusion_pytorch_model.safetensors"] = component
        files[model / "tokenizer" / "tokenizer_config.json"] = "{}"
    files[src / WEIGHTS / "tiny-trained-moga" / "transformer" / "longreel_routers.safetensors"] = "routers"
    files[src / WEIGHTS / "tiny-trained" / "vae" / "config.json"] = "{}"
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    os.symlink(Path("..") / "tiny-trained" / "vae", src / WEIGHTS / "tiny-trained-moga" / "vae")
    want = {p.relative_to(src).as_posix() for p in files}
    return want | {(WEIGHTS / "tiny-trained-moga" / "vae" / "config.json").as_posix()}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[Path, set[str]]:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "weights")  # the repo's own weights: a fake set below
    for name in ("pipeline", "actors", "jobs", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=skip)
    want = _fake_shipped_weights(src)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(out), str(src)], check=True, capture_output=True, cwd=src)
    (path,) = out.glob("longreel-*.whl")
    return path, want


def test_wheel_holds_configs_and_shipped_weights(wheel):
    path, want_weights = wheel
    names = set(zipfile.ZipFile(path).namelist())
    configs = {p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*") if p.is_file()}
    assert configs and configs <= names, sorted(configs - names)
    assert want_weights <= names, sorted(want_weights - names)
    assert {"pipeline/cli.py", "actors/batch.py", "jobs/generate.py"} <= names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_installed_wheel_finds_configs_and_shipped_weights_from_anywhere(wheel, tmp_path):
    path, _ = wheel
    site = tmp_path / "site"
    zipfile.ZipFile(path).extractall(site)
    probe = ("import json, pipeline; from pipeline.config import CONFIG_DIR, load_config; "
             "from pipeline.models.loader import shipped_path; "
             "cfg = load_config(None, ['model=tiny-trained-moga']); "
             "print(json.dumps([pipeline.__file__, str(CONFIG_DIR), cfg.video.name, shipped_path(cfg.model.path)]))")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    module, config_dir, name, weights = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(module).is_relative_to(site) and Path(config_dir) == site / "configs" and name == "demo"
    assert Path(weights) == site / WEIGHTS / "tiny-trained-moga"
    assert (Path(weights) / "vae" / "config.json").is_file()
