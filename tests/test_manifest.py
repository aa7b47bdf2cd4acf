"""Manifests: every entry becomes a validated Config; a bad entry is one line naming file, line, key."""

import json

import pytest

from pipeline.config import CONFIG_DIR, ConfigError, load_config
from pipeline.manifest import ManifestError, load_manifest, parse_manifest

BATCH = CONFIG_DIR / "examples" / "batch.jsonl"
SHOT = {"prompt": "a red ball", "seconds": 1}


@pytest.fixture(scope="module")
def base():
    return load_config(None, ["sampling.steps=3"])


def _jsonl(*entries) -> str:
    return "\n".join(e if isinstance(e, str) else json.dumps(e) for e in entries) + "\n"


def test_shipped_batch_resolves_each_entry_onto_the_base():
    m = load_manifest(BATCH, overrides=["video.height=64"])
    assert m.names == ["circle", "square", "stripes"] and m.source == "batch.jsonl"
    circle, square, stripes = (v.config for v in m.videos)
    assert [s.seconds for s in circle.video.shots] == [2.0, 1.0] and circle.video.seed == 1
    assert square.sampling.steps == 4 and circle.sampling.steps == 10  # entry overrides stay per video
    assert stripes.video.fps == 6 and circle.video.fps == 8
    assert all(v.config.video.height == 64 for v in m.videos)  # command-line overrides reach every video
    assert [v.line for v in m.videos] == [1, 2, 3]


def test_jsonl_blank_lines_keep_line_numbers_and_defaults_come_from_the_base(base):
    text = _jsonl({"name": "a", "shots": [SHOT]}, "", {"name": "b", "shots": [SHOT], "seed": 9, "fps": 4,
                                                      "overrides": {"attention": "dense", "video.width": 64}})
    m = parse_manifest(text, base)
    a, b = m.videos
    assert (a.line, b.line) == (1, 3)
    assert a.config.video.seed == base.video.seed and a.config.sampling.steps == 3
    assert b.config.video.seed == 9 and b.config.video.fps == 4 and b.config.video.width == 64
    assert a.config.video.width == base.video.width


def test_yaml_list_and_videos_mapping_report_entry_lines(base):
    text = "videos:\n  - name: a\n    shots: [{prompt: x, seconds: 1}]\n  - name: b\n    shots:\n      - {prompt: y, seconds: 0}\n"
    with pytest.raises(ManifestError) as e:
        parse_manifest(text, base, source="b.yaml", fmt="yaml")
    assert str(e.value) == "b.yaml:4: video.shots.0.seconds: must be > 0 (got 0.0)"
    m = parse_manifest("- {name: a, shots: [{prompt: x, seconds: 1}]}\n", base, source="a.yaml", fmt="yaml")
    assert m.names == ["a"]
    with pytest.raises(ManifestError, match=r"^c.yaml:1: jobs: unknown key"):
        parse_manifest("jobs: []\n", base, source="c.yaml", fmt="yaml")


@pytest.mark.parametrize("bad_line, message", [
    ('{"name": "x", "shots": [', "batch.jsonl:2: json: not valid JSON: Expecting value at column 25"),
    ('{"name": "x", "shots": [{"prompt": "p", "seconds": 1}], "colour": "red"}',
     "batch.jsonl:2: colour: unknown key (known: name, shots, seed, fps, height, width, negative_prompt, "
     "overrides) (got 'red')"),
    ('{"name": "x", "shots": [{"prompt": "p", "seconds": 0}]}',
     "batch.jsonl:2: video.shots.0.seconds: must be > 0 (got 0.0)"),
    ('{"name": "x", "shots": [{"prompt": "p", "seconds": -1}]}',
     "batch.jsonl:2: video.shots.0.seconds: must be > 0 (got -1.0)"),
    ('{"name": "ok", "shots": [{"prompt": "p", "seconds": 1}]}', "batch.jsonl:2: name: duplicate of line 1 (got 'ok')"),
    ('{"shots": [{"prompt": "p", "seconds": 1}]}', "batch.jsonl:2: name: required (got None)"),
    ('{"name": "x", "shots": [{"prompt": "p", "seconds": 1}], "overrides": {"sampling.stepz": 3}}',
     "batch.jsonl:2: sampling.stepz: unknown key (got 3)"),
    ('{"name": "x", "shots": [{"prompt": "p", "seconds": 1}], "overrides": ["sampling.steps"]}',
     "batch.jsonl:2: overrides: expected key=value (got 'sampling.steps')"),
    ('{"name": "x y", "shots": [{"prompt": "p", "seconds": 1}]}', "batch.jsonl:2: video.name: must be 1-128"),
    ('["x"]', "batch.jsonl:2: video: must be an object with name and shots (got ['x'])"),
    ('{"name": "x", "shots": [{"prompt": "p", "seconds": 1}], "overrides": {"parallel.degree": 2}}',
     "batch.jsonl:2: parallel.degree: must be the same for every video of a batch (line 1 has 1"),
])
def test_bad_entries_fail_with_one_line_naming_the_line(base, bad_line, message):
    text = _jsonl({"name": "ok", "shots": [SHOT]}, bad_line)
    with pytest.raises(ManifestError) as e:
        parse_manifest(text, base, source="batch.jsonl")
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value) and isinstance(e.value, ConfigError)


def test_empty_and_unreadable_manifests(base, tmp_path):
    with pytest.raises(ManifestError, match=r"^m.jsonl:1: videos: the manifest holds no videos"):
        parse_manifest("\n\n", base, source="m.jsonl")
    with pytest.raises(ConfigError, match=r"^manifest: cannot read"):
        load_manifest(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("name", ["bench-ray.jsonl", "bench-ray-long.jsonl"])
def test_shipped_benchmark_manifests_resolve_on_their_base(name):
    m = load_manifest(CONFIG_DIR / "examples" / name, CONFIG_DIR / "examples" / "bench-ray-wan1.3b.yaml")
    assert len(m.names) == len(set(m.names)) == (24 if "long" in name else 8)
    assert all(v.config.video.height == 480 for v in m.videos)
    assert all(sum(s.seconds for s in v.config.video.shots) == 5 for v in m.videos)
