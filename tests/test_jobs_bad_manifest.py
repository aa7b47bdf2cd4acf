"""`python -m jobs.generate` on bad manifests: exit 2 with one line naming file, line, key and value,
before Ray is even imported (so no actor, no placement group, no object is ever created)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOOD = {"name": "ok", "shots": [{"prompt": "a red ball", "seconds": 1}]}

BAD = {
    "bad-json.jsonl": ('{"name": "x", "shots": [}', "bad-json.jsonl:2: json: not valid JSON"),
    "unknown-key.jsonl": ({**GOOD, "name": "x", "prompt": "p"}, "unknown-key.jsonl:2: prompt: unknown key"),
    "zero-seconds.jsonl": ({"name": "x", "shots": [{"prompt": "p", "seconds": 0}]},
                           "zero-seconds.jsonl:2: video.shots.0.seconds: must be > 0 (got 0.0)"),
    "duplicate.jsonl": (GOOD, "duplicate.jsonl:2: name: duplicate of line 1 (got 'ok')"),
}

SCRIPT = """
import sys
import jobs.generate as g
for path in sys.argv[1:]:
    print("rc", g.main([path]), flush=True)
print("ray imported:", "ray" in sys.modules)
"""


def test_bad_manifests_fail_before_ray_naming_the_line(tmp_path):
    paths = []
    for name, (entry, _) in BAD.items():
        path = tmp_path / name
        second = entry if isinstance(entry, str) else json.dumps(entry)
        path.write_text(json.dumps(GOOD) + "\n" + second + "\n")
        paths.append(str(path))
    run = subprocess.run([sys.executable, "-c", SCRIPT, *paths], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert run.stdout.splitlines() == ["rc 2"] * len(BAD) + ["ray imported: False"], run.stderr
    errors = run.stderr.splitlines()
    assert len(errors) == len(BAD)
    for line, (_, expected) in zip(errors, BAD.values()):
        assert line.startswith(f"generate: error: {expected}"), line
    assert not (tmp_path / "outputs").exists()  # nothing written, not even a results manifest
