"""Typed configuration: dataclasses are the schema, OmegaConf merges YAML and `key=value` overrides.

A config file names presets for its groups (``model: tiny-wan`` loads configs/models/tiny-wan.yaml)
or spells them out inline. Overrides on the command line follow the same rule: ``model=tiny-sana``
swaps the preset, ``model.dtype=bfloat16`` sets one key. The result is validated once and frozen;
every error is one line that names the key and the value (ConfigError).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "examples" / "demo.yaml"
# Groups whose value may name a preset file: config key -> directory under configs/.
PRESET_DIRS = {"model": "models", "attention": "attention", "storage": "storage", "parallel": "parallel"}
PRESET_GROUPS = tuple(PRESET_DIRS)


class ConfigError(ValueError):
    """Bad user input; str() is one line naming the key and the value."""

    def __init__(self, key: str, value: Any, reason: str):
        self.key, self.value, self.reason = key, value, reason
        super().__init__(f"{key}: {reason} (got {value!r})")

    def __reduce__(self):  # pickle (Ray) rebuilds from the constructor's arguments, not from args
        return type(self), (self.key, self.value, self.reason), self.__dict__


# ---------------------------------------------------------------------------------------------
# 1. Schema
# ---------------------------------------------------------------------------------------------


@dataclass
class ShotConfig:
    prompt: str = MISSING
    seconds: float = MISSING


@dataclass
class VideoConfig:
    name: str = "video"
    shots: list[ShotConfig] = field(default_factory=list)
    fps: int = 16
    height: int = 480
    width: int = 832
    seed: int = 0
    negative_prompt: str = ""


@dataclass
class ModelConfig:
    preset: str = "tiny-wan"  # the configs/models/ file this came from (recorded in the video's JSON)
    family: str = "wan"  # wan | sana
    # Local directory or hub id in diffusers layout (transformer/, vae/, text_encoder/, tokenizer/).
    # Empty: build `architecture` with random weights once, save it under `cache_dir`, and load it
    # from there through the same loader as real weights.
    path: str = ""
    revision: str = ""
    dtype: str = "float32"  # float32 | bfloat16 | float16
    vae_dtype: str = "float32"
    device: str = "auto"  # auto | cpu | cuda
    text_max_length: int = 512
    # Prepended to each shot's prompt (not the negative prompt) before encoding; the encoder keeps the
    # first token and the last text_max_length - 1 (SANA-Video's "complex human instruction").
    text_instruction: str = ""
    cache_dir: str = "~/.cache/longreel"
    # Only for path == "": constructor kwargs per component (transformer, vae, text_encoder, ...).
    architecture: dict[str, Any] = field(default_factory=dict)
    # VAE and patch geometry: pixel frames 1+4k -> latent frames 1+k; 8x spatial; patch 1x2x2.
    vae_temporal: int = 4
    vae_spatial: int = 8
    patch: list[int] = field(default_factory=lambda: [1, 2, 2])


@dataclass
class MogaConfig:
    num_groups: int = 5  # M
    balance_weight: float = 1e-3  # alpha of L_gb = alpha * M * sum_i F_i * P_i
    # auto: the weights' routers when they ship some, else kmeans | checkpoint | kmeans (training-free:
    # centroids of the first step's hidden states, frozen for the video) | random
    router_init: str = "auto"
    kmeans_iters: int = 10


@dataclass
class StgaConfig:
    window: list[int] = field(default_factory=lambda: [1, 8, 8])  # (t, y, x) in tokens
    cross_shots: bool = False  # may a window span a shot cut?


@dataclass
class MocConfig:
    chunk_frames: int = 1  # a chunk = this many latent frames of one shot
    top_k: int = 3
    causal: bool = True  # no routing to future chunks
    local_frames: int = 1  # anchor: chunks of the same shot within this many frames
    text_anchor: bool = True


@dataclass
class LiteConfig:
    base: str = "dense"  # mask the skips refine: dense | stga
    full_steps: int = 2  # steps computed on the base mask while margins are recorded
    threshold: float = -10.0  # log2 units: skip a tile whose max logit trails the row max by more
    tile: list[int] = field(default_factory=lambda: [128, 128])  # (q, k) tokens


@dataclass
class LinearConfig:
    eps: float = 1e-15
    causal: bool = False  # block-causal across the layout's blocks (shots or block_frames)


@dataclass
class AttentionConfig:
    method: str = "dense"  # dense | moga | stga | moga+stga | moc | lite | linear
    backend: str = "auto"  # auto | sdpa | flash_attn | varlen | flex | cpu
    dense_layers: list[int] = field(default_factory=list)  # layers kept dense whatever the method
    merge: str = "lse"  # moga+stga: lse (exact, one softmax over the union) | sum
    moga: MogaConfig = field(default_factory=MogaConfig)
    stga: StgaConfig = field(default_factory=StgaConfig)
    moc: MocConfig = field(default_factory=MocConfig)
    lite: LiteConfig = field(default_factory=LiteConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)


@dataclass
class SamplingConfig:
    steps: int = 50
    guidance_scale: float = 5.0
    scheduler: str = "flow_euler"  # flow_euler | unipc
    shift: float = 5.0
    mode: str = "joint"  # joint: one sequence | block: a block per shot or per block_frames
    block_frames: int = 0  # latent frames per block in block mode; 0 = one block per shot
    sink_frames: int = 1  # softmax models in block mode: clean frames always kept in the cache
    window_frames: int = 8  # ... and the most recent clean frames kept


@dataclass
class ParallelConfig:
    degree: int = 1  # context-parallel ranks P sharing one sequence (Ulysses)
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    timeout_s: int = 600
    ring: bool = False  # dense layers only, when P exceeds the head count (GPU)


@dataclass
class S3Config:
    endpoint_url: str = ""  # any S3-compatible server (MinIO, R2, GCS interop); empty = AWS
    region: str = ""
    part_size_mib: int = 8  # multipart parts (>= 5 MiB but the last)
    max_attempts: int = 5


@dataclass
class StorageConfig:
    uri: str = "file://outputs"  # file://DIR or s3://BUCKET/PREFIX
    s3: S3Config = field(default_factory=S3Config)


@dataclass
class OutputConfig:
    codec: str = "libx264"
    crf: int = 18
    preset: str = "medium"


@dataclass
class ClusterConfig:
    address: str = ""  # Ray address; empty = local cluster (or RAY_ADDRESS)
    groups: int = 0  # worker groups for a batch; 0 = as many as the cluster's resources allow
    gpus_per_worker: float = 1.0  # 0 = CPU-only workers (gloo)
    cpus_per_worker: float = 1.0
    resource_timeout_s: int = 600
    max_block_retries: int = 2


@dataclass
class Config:
    video: VideoConfig = field(default_factory=VideoConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


# ---------------------------------------------------------------------------------------------
# 2. Loading: presets, YAML, overrides
# ---------------------------------------------------------------------------------------------


def preset_names(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / PRESET_DIRS[group]).glob("*.yaml"))


def _read_yaml(path: Path, key: str) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(key, str(path), "file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "somewhere"
        raise ConfigError(key, str(path), f"not valid YAML at {where}") from None
    if not isinstance(data, dict):
        raise ConfigError(key, str(path), "must hold a mapping of keys")
    return data


def _preset(group: str, name: Any) -> dict:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
        raise ConfigError(group, name, "expected a preset name or a mapping")
    path = CONFIG_DIR / PRESET_DIRS[group] / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(group, name, f"unknown preset (known: {', '.join(preset_names(group))})")
    data = _read_yaml(path, group)
    if group == "model":
        data.setdefault("preset", name)
    return data


def _expand_presets(data: dict) -> dict:
    out = dict(data)
    for group in PRESET_GROUPS:
        if isinstance(out.get(group), str):
            out[group] = _preset(group, out[group])
    return out


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError("override", text, "expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", key):
        raise ConfigError("override", text, "expected key=value with a dotted key")
    try:  # YAML scalars and flow collections: 3, 2.5, true, [1, 8, 8], {prompt: x, seconds: 2}
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _format_omegaconf_error(e: OmegaConfBaseException) -> ConfigError:
    key = re.sub(r"\[(\d+)\]", r".\1", getattr(e, "full_key", None) or "config")
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    m = re.match(r"Key '([^']+)' not in '(\w+)'", msg)
    if m:
        return ConfigError(key, m.group(1), "unknown key")
    m = re.match(r"Value '(.*)' of type '(\w+)' could not be converted to (\w+)", msg)
    if m:
        return ConfigError(key, m.group(1), f"expected {m.group(3).lower()}, got {m.group(2)}")
    m = re.match(r"Value '(.*)' (?:is not|could not be)", msg)
    if m:
        return ConfigError(key, m.group(1), msg.split("'", 2)[-1].strip(" ."))
    if "Missing mandatory value" in msg:
        return ConfigError(key, "???", "required")
    return ConfigError(key, getattr(e, "value", None), msg)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """YAML file (default: configs/examples/demo.yaml) + `key=value` overrides -> frozen Config."""
    data = _expand_presets(_read_yaml(Path(path) if path else DEFAULT_CONFIG, "config"))
    dotted: list[tuple[str, Any]] = []
    for text in overrides:
        key, value = _parse_override(text)
        if key in PRESET_GROUPS and isinstance(value, str):
            data[key] = _preset(key, value)  # swap the whole group: no keys of the old preset linger
        else:
            dotted.append((key, value))
    return build_config(data, dotted)


def build_config(data: dict, dotted: list[tuple[str, Any]] | tuple = ()) -> Config:
    """Merge a plain dict (preset names allowed) and dotted overrides onto the schema; validate; freeze."""
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), _expand_presets(data))
        for key, value in dotted:
            parent_key, _, leaf = key.rpartition(".")
            parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
            if parent is None or (isinstance(parent, DictConfig) and leaf not in parent
                                  and OmegaConf.get_type(parent) is not dict):
                raise ConfigError(key, value, "unknown key")
            OmegaConf.update(cfg, key, value, merge=True)
        OmegaConf.to_object(cfg)  # raises on missing mandatory values
    except OmegaConfBaseException as e:
        raise _format_omegaconf_error(e) from None
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg  # type: ignore[return-value]  (a read-only DictConfig typed by Config)


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# 3. Validation: what the schema's types cannot say
# ---------------------------------------------------------------------------------------------

FAMILIES = ("wan", "sana")
DTYPES = ("float32", "bfloat16", "float16")
SCHEDULERS = ("flow_euler", "unipc")
MODES = ("joint", "block")


def _check(ok: bool, key: str, value: Any, reason: str) -> None:
    if not ok:
        raise ConfigError(key, value, reason)


def _one_of(key: str, value: Any, allowed: tuple[str, ...] | list[str]) -> None:
    _check(value in allowed, key, value, f"must be one of {', '.join(allowed)}")


def _transformer_int(m: ModelConfig, key: str) -> int:
    """model.architecture.transformer[key] (random-weight presets, and presets that describe their
    shipped weights); 0 when only the weights know. Heads the config cannot know are checked when the
    model is parallelized (pipeline.parallel.ulysses.check_heads)."""
    value = (m.architecture.get("transformer") or {}).get(key)
    return value if isinstance(value, int) and value > 0 else 0


def _shards_heads(cfg: Config) -> bool:
    """Whether some layer's attention needs heads % parallel.degree == 0 (attention.base.shards_heads,
    the rule pipeline.parallel.dit wraps layers by)."""
    from pipeline.attention import METHODS
    from pipeline.attention.base import shards_heads

    a = cfg.attention
    layers = _transformer_int(cfg.model, "num_layers")
    all_dense = layers > 0 and set(range(layers)) <= set(a.dense_layers)
    methods = {"dense"} if all_dense else {a.method, *(["dense"] if a.dense_layers else [])}
    return any(shards_heads(METHODS[name], cfg.parallel.ring) for name in methods)


def validate(cfg: Config) -> None:
    from pipeline.attention import method_names  # the registry knows the methods

    v, m, s = cfg.video, cfg.model, cfg.sampling
    _check(bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", v.name)), "video.name", v.name,
           "must be 1-128 characters of letters, digits, '_', '.', '-' (it names the output files)")
    _check(len(v.shots) > 0, "video.shots", [], "at least one shot is required")
    for i, shot in enumerate(v.shots):
        _check(bool(shot.prompt.strip()), f"video.shots.{i}.prompt", shot.prompt, "must not be empty")
        _check(shot.seconds > 0, f"video.shots.{i}.seconds", shot.seconds, "must be > 0")
    _check(v.fps > 0, "video.fps", v.fps, "must be > 0")
    unit = m.vae_spatial * m.patch[1]
    for key, size in (("video.height", v.height), ("video.width", v.width)):
        _check(size > 0 and size % unit == 0, key, size,
               f"must be a positive multiple of {unit} (VAE {m.vae_spatial}x * patch {m.patch[1]})")
    # Every shot must cover at least one latent frame (vae_temporal pixel frames).
    for i, shot in enumerate(v.shots):
        frames = shot.seconds * v.fps
        _check(frames >= m.vae_temporal / 2, f"video.shots.{i}.seconds", shot.seconds,
               f"is {frames:g} frames at {v.fps} fps, less than half a latent frame "
               f"({m.vae_temporal} frames)")

    _one_of("model.family", m.family, FAMILIES)
    _one_of("model.dtype", m.dtype, DTYPES)
    _one_of("model.vae_dtype", m.vae_dtype, DTYPES)
    _check(m.device in ("auto", "cpu", "cuda") or m.device.startswith("cuda:"), "model.device", m.device,
           "must be auto, cpu, cuda or cuda:N")
    _check(bool(m.path) or bool(m.architecture), "model.path", m.path,
           "is empty and the preset has no `architecture` to build")
    _check(len(m.patch) == 3 and m.patch[0] == 1, "model.patch", list(m.patch), "must be [1, p, p]")

    a = cfg.attention
    _one_of("attention.method", a.method, method_names())
    if m.family == "sana":  # SANA-Video is trained with linear self-attention
        _check(a.method == "linear", "attention.method", a.method,
               f"{m.preset} uses linear self-attention: set attention=linear")
    _one_of("attention.merge", a.merge, ("lse", "sum"))
    _check(a.moga.num_groups >= 1, "attention.moga.num_groups", a.moga.num_groups, "must be >= 1")
    _one_of("attention.moga.router_init", a.moga.router_init, ("auto", "checkpoint", "kmeans", "random"))
    _check(len(a.stga.window) == 3 and min(a.stga.window) >= 1, "attention.stga.window",
           list(a.stga.window), "must be three sizes >= 1 (t, y, x)")
    _check(a.moc.top_k >= 0, "attention.moc.top_k", a.moc.top_k, "must be >= 0")
    _check(a.moc.chunk_frames >= 1, "attention.moc.chunk_frames", a.moc.chunk_frames, "must be >= 1")
    _check(a.lite.threshold < 0, "attention.lite.threshold", a.lite.threshold, "must be < 0 (log2 units)")
    _one_of("attention.lite.base", a.lite.base, ("dense", "stga"))
    _check(len(a.lite.tile) == 2 and min(a.lite.tile) >= 1, "attention.lite.tile", list(a.lite.tile),
           "must be two sizes >= 1 (q, k)")

    _check(s.steps >= 1, "sampling.steps", s.steps, "must be >= 1")
    _check(s.guidance_scale >= 0, "sampling.guidance_scale", s.guidance_scale, "must be >= 0")
    _one_of("sampling.scheduler", s.scheduler, SCHEDULERS)
    _one_of("sampling.mode", s.mode, MODES)
    _check(s.block_frames >= 0, "sampling.block_frames", s.block_frames, "must be >= 0")
    _check(s.window_frames >= 1, "sampling.window_frames", s.window_frames, "must be >= 1")
    _check(s.sink_frames >= 0, "sampling.sink_frames", s.sink_frames, "must be >= 0")
    if s.mode == "block" and m.family == "wan":  # what carries across blocks: a rolling KV cache of dense layers
        _check(a.method == "dense", "attention.method", a.method,
               "sampling.mode=block on Wan carries a rolling KV cache of dense attention only: use attention=dense "
               "or sampling.mode=joint")

    p = cfg.parallel
    _check(p.degree >= 1, "parallel.degree", p.degree, "must be >= 1")
    _one_of("parallel.backend", p.backend, ("auto", "nccl", "gloo"))
    heads = _transformer_int(m, "num_attention_heads")
    if p.degree > 1 and heads and heads % p.degree and _shards_heads(cfg):
        divisors = ", ".join(str(d) for d in range(1, heads + 1) if heads % d == 0)
        ring = " or parallel.ring=true" if a.method == "dense" and not p.ring else ""
        raise ConfigError("parallel.degree", p.degree, f"must divide the model's {heads} attention heads "
                          f"(Ulysses shards heads over ranks; use one of {divisors}{ring})")
    if s.mode == "block" and m.family == "sana":  # the carried Mix-FFN conv tail needs a block's frames on one rank
        _check(p.degree == 1, "parallel.degree", p.degree,
               "sampling.mode=block on SANA-Video carries its temporal-conv tail on one rank: use parallel.degree=1 "
               "or sampling.mode=joint")

    st = cfg.storage
    _check(st.uri.startswith(("file://", "s3://")), "storage.uri", st.uri, "must start with file:// or s3://")
    if st.uri.startswith("s3://"):
        bucket = st.uri[5:].split("/", 1)[0]
        _check(bool(re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket)), "storage.uri", st.uri,
               "bucket name must be 3-63 characters of a-z, 0-9, '.', '-'")
    _check(st.s3.part_size_mib >= 5, "storage.s3.part_size_mib", st.s3.part_size_mib,
           "must be >= 5 (S3's minimum part size)")
    _check(st.s3.max_attempts >= 1, "storage.s3.max_attempts", st.s3.max_attempts, "must be >= 1")
    _check(0 <= cfg.output.crf <= 51, "output.crf", cfg.output.crf, "must be in 0..51")
    _check(cfg.cluster.gpus_per_worker >= 0, "cluster.gpus_per_worker", cfg.cluster.gpus_per_worker,
           "must be >= 0")
