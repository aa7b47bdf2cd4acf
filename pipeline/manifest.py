"""Batch manifests: many videos, each a full validated Config, checked before anything starts.

A manifest is JSONL (one JSON object per line; blank lines are skipped) or YAML (a list of the same
objects, or a mapping with a `videos:` list). One entry is one video:

    {"name": "harbour", "shots": [{"prompt": "...", "seconds": 4}, ...], "seed": 7,
     "overrides": {"sampling.steps": 30, "attention": "moga+stga"}}

`name` and `shots` are required; `seed`, `fps`, `height`, `width` and `negative_prompt` default to
the base config's `video` section; `overrides` are dotted keys (a mapping, or a list of "key=value"
strings) applied to this video only. The base config is a config file (default the demo) plus the
command line's `key=value` overrides; each entry becomes base + entry fields + entry overrides,
validated by pipeline.config like any other config.

Errors name the file and line, then the key and the value, in one line:
    batch.jsonl:3: video.shots.0.seconds: must be > 0 (got 0)
Every video of a batch runs on the same kind of worker group (one model loaded per group, one
context-parallel degree, one set of attention methods), so `model`, `attention`, `parallel` and
`cluster` may not differ between entries.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import PRESET_GROUPS, Config, ConfigError, _parse_override, build_config, load_config, to_dict

VIDEO_FIELDS = ("name", "shots", "seed", "fps", "height", "width", "negative_prompt")
ENTRY_KEYS = (*VIDEO_FIELDS, "overrides")
# Sections a worker group is built from: equal for every video of a batch.
GROUP_SECTIONS = ("model", "attention", "parallel", "cluster")


class ManifestError(ConfigError):
    """A bad manifest entry: `FILE:LINE: key: reason (got value)`."""

    def __init__(self, source: str, line: int, key: str, value: Any, reason: str):
        super().__init__(key, value, reason)
        self.source, self.line = source, line
        self.args = (f"{source}:{line}: {key}: {reason} (got {value!r})",)

    def __reduce__(self):
        return type(self), (self.source, self.line, self.key, self.value, self.reason), self.__dict__

    def __str__(self) -> str:
        return self.args[0]


@dataclass(frozen=True)
class VideoEntry:
    """One video of a manifest: where it was written and the Config it resolved to."""

    line: int
    config: Config

    @property
    def name(self) -> str:
        return self.config.video.name


@dataclass(frozen=True)
class Manifest:
    source: str  # the file name, as errors and the results manifest cite it
    base: Config  # config file + command-line overrides, before any entry
    videos: tuple[VideoEntry, ...]

    @property
    def names(self) -> list[str]:
        return [v.name for v in self.videos]


def load_manifest(path: str | Path, config: str | Path | None = None, overrides: list[str] | tuple = ()) -> Manifest:
    """Read, resolve and validate every entry of the manifest at `path` (see the module docstring)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError("manifest", str(path), f"cannot read: {e.strerror or type(e).__name__}") from None
    base = load_config(config, overrides)
    fmt = "yaml" if path.suffix.lower() in (".yaml", ".yml") else "jsonl"
    return parse_manifest(text, base, source=path.name, fmt=fmt)


def parse_manifest(text: str, base: Config, source: str = "manifest.jsonl", fmt: str = "jsonl") -> Manifest:
    entries = _jsonl_entries(text, source) if fmt == "jsonl" else _yaml_entries(text, source)
    if not entries:
        raise ManifestError(source, 1, "videos", [], "the manifest holds no videos")
    base_data = to_dict(base)
    videos: list[VideoEntry] = []
    first_line: dict[str, int] = {}
    for line, entry in entries:
        cfg = _entry_config(entry, base_data, source, line)
        name = cfg.video.name
        if name in first_line:
            raise ManifestError(source, line, "name", name, f"duplicate of line {first_line[name]}")
        first_line[name] = line
        if videos:
            _check_same_group(videos[0], cfg, source, line)
        videos.append(VideoEntry(line=line, config=cfg))
    return Manifest(source=source, base=base, videos=tuple(videos))


# ---------------------------------------------------------------------------------------------
# Reading entries with their line numbers
# ---------------------------------------------------------------------------------------------


def _jsonl_entries(text: str, source: str) -> list[tuple[int, Any]]:
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entries.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            raise ManifestError(source, number, "json", _clip(line), f"not valid JSON: {e.msg} at column {e.colno}")
    return entries


def _yaml_entries(text: str, source: str) -> list[tuple[int, Any]]:
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        raise ManifestError(source, line, "yaml", getattr(e, "problem", None) or "", "not valid YAML") from None
    if root is None:
        return []
    items_node, items = root, data
    if isinstance(root, yaml.MappingNode):
        extra = [k for k in data if k != "videos"]
        if extra:
            node = next(k for k, _ in root.value if k.value == extra[0])
            raise ManifestError(source, node.start_mark.line + 1, extra[0], data[extra[0]],
                                "unknown key (a YAML manifest is a list of videos or a mapping with `videos:`)")
        items_node = next((v for k, v in root.value if k.value == "videos"), None)
        items = data.get("videos")
    if not isinstance(items_node, yaml.SequenceNode):
        raise ManifestError(source, root.start_mark.line + 1, "videos", _clip(items), "must be a list of videos")
    return [(node.start_mark.line + 1, item) for node, item in zip(items_node.value, items)]


def _clip(value: Any, limit: int = 60) -> Any:
    """The value as an error shows it: itself when short, else the start of its text."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return value if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------------------------------
# One entry -> one Config
# ---------------------------------------------------------------------------------------------


def _entry_overrides(raw: Any, source: str, line: int) -> list[tuple[str, Any]]:
    if raw is None:
        return []
    if isinstance(raw, dict):
        return [(str(k), v) for k, v in raw.items()]
    if isinstance(raw, list) and all(isinstance(x, str) for x in raw):
        pairs = []
        for text in raw:
            try:
                pairs.append(_parse_override(text))
            except ConfigError as e:
                raise ManifestError(source, line, "overrides", text, e.reason) from None
        return pairs
    raise ManifestError(source, line, "overrides", _clip(raw),
                        'must be a mapping {"dotted.key": value} or a list of "key=value" strings')


def _entry_config(entry: Any, base_data: dict, source: str, line: int) -> Config:
    if not isinstance(entry, dict):
        raise ManifestError(source, line, "video", _clip(entry), "must be an object with name and shots")
    for key in entry:
        if key not in ENTRY_KEYS:
            raise ManifestError(source, line, str(key), _clip(entry[key]),
                                f"unknown key (known: {', '.join(ENTRY_KEYS)})")
    for key in ("name", "shots"):
        if key not in entry:
            raise ManifestError(source, line, key, None, "required")
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base_data.items()}
    data["video"] = {**base_data["video"], **{k: entry[k] for k in VIDEO_FIELDS if k in entry}}
    dotted = []
    for key, value in _entry_overrides(entry.get("overrides"), source, line):
        if key in PRESET_GROUPS and isinstance(value, str):
            data[key] = value  # a preset name swaps the whole group, as on the command line
        else:
            dotted.append((key, value))
    try:
        return build_config(data, dotted)
    except ConfigError as e:
        raise ManifestError(source, line, e.key, e.value, e.reason) from None


def _check_same_group(first: VideoEntry, cfg: Config, source: str, line: int) -> None:
    a, b = to_dict(first.config), to_dict(cfg)
    for section in GROUP_SECTIONS:
        for key in sorted(set(a[section]) | set(b[section])):
            if a[section].get(key) != b[section].get(key):
                raise ManifestError(source, line, f"{section}.{key}", _clip(b[section].get(key)),
                                    f"must be the same for every video of a batch (line {first.line} has "
                                    f"{_clip(a[section].get(key))!r}: one kind of worker group per batch)")
