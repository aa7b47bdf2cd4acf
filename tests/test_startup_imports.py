"""What a batch job's start-up imports, on its critical path: the scheduler actor's process comes up
before its workers can be created, so its module must not pull in torch (~1.5-3 s) or the model stack."""

import subprocess
import sys


def test_the_scheduler_actor_module_imports_no_torch():
    code = ("import sys, actors.scheduler; heavy = [m for m in ('torch', 'diffusers', 'transformers', 'triton', "
            "'pipeline.attention', 'pipeline.models') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
