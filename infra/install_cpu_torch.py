"""Install a CPU-only torch into the running interpreter's environment.

pip's default for `torch` on Linux is the CUDA build (several GB). Ask pip which file it would
take; keep it if it is a CPU build (a `+cpu` wheel from a local wheelhouse), else install from
PyTorch's CPU index. Usage: python infra/install_cpu_torch.py "torch==2.13.0"
"""

import json
import subprocess
import sys

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
pip = [sys.executable, "-m", "pip"]
spec = sys.argv[1] if len(sys.argv) > 1 else "torch"

report = subprocess.run(pip + ["install", "--dry-run", "--quiet", "--no-deps", "--report", "-", spec],
                        capture_output=True, text=True)
url = ""
if report.returncode == 0 and report.stdout.strip():
    items = json.loads(report.stdout).get("install", [])
    if not items:
        sys.exit(print(f"torch: {spec} already installed"))
    url = next((i["download_info"]["url"] for i in items if i["metadata"]["name"] == "torch"), "")
if "+cpu" in url or url.startswith("file:"):
    print(f"torch: CPU build found locally ({url.rsplit('/', 1)[-1]})")
    cmd = pip + ["install", "-q", spec]
else:
    print(f"torch: installing from the CPU index {CPU_INDEX}")
    cmd = pip + ["install", "-q", spec, "--index-url", CPU_INDEX, "--extra-index-url", "https://pypi.org/simple"]
sys.exit(subprocess.call(cmd))
