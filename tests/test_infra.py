"""Deployment files: the cluster launcher YAML passes Ray's own validator; KubeRay and Docker files
agree with each other and with the Ray version the project runs; every `python -m` entrypoint they
name (the RayJob's, and the submit commands their comments document) runs a module of this repo on a
manifest that exists here or is a placeholder for the user's, on GPU workers."""

import re
from pathlib import Path

import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
# `python -m MODULE ARG ...`, in a YAML value or a comment, up to the end of the line or a comment.
ENTRYPOINT = re.compile(r"python -m ([\w.]+)((?:[ \t]+[^\s#]+)*)")
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*")  # MANIFEST, BASE: the user's own file
RAY_VERSION = ray.__version__


def _docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_cluster_launcher_yaml_passes_rays_validator():
    cfg = yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())
    validate_config(prepare_config(cfg))
    gpu_types = {k: v for k, v in cfg["available_node_types"].items() if v.get("resources", {}).get("GPU")}
    assert gpu_types and all(v["min_workers"] == 0 for v in gpu_types.values())  # scale from zero
    assert "--autoscaling-config" in " ".join(cfg["head_start_ray_commands"])


def _cluster_specs():
    cluster = _docs(INFRA / "kuberay" / "raycluster.yaml")[0]
    job = _docs(INFRA / "kuberay" / "rayjob.yaml")[0]
    assert cluster["apiVersion"] == job["apiVersion"] == "ray.io/v1"
    assert (cluster["kind"], job["kind"]) == ("RayCluster", "RayJob")
    return [cluster["spec"], job["spec"]["rayClusterSpec"]]


def test_kuberay_specs_autoscale_gpu_groups_from_zero():
    for spec in _cluster_specs():
        assert spec["rayVersion"] == RAY_VERSION
        assert spec["enableInTreeAutoscaling"] is True
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        for group in spec["workerGroupSpecs"]:
            assert group["minReplicas"] == 0 <= group["replicas"] <= group["maxReplicas"]
            (container,) = group["template"]["spec"]["containers"]
            gpus = container["resources"]["limits"]["nvidia.com/gpu"]
            assert group["rayStartParams"]["num-gpus"] == gpus == container["resources"]["requests"]["nvidia.com/gpu"]
            env = {e["name"]: e["value"] for e in container.get("env", [])}
            assert env.get("NCCL_NVLS_ENABLE") == "0"


def test_images_and_versions_agree():
    base = re.search(r"^FROM rayproject/ray:(\S+)", (INFRA / "Dockerfile").read_text(), re.M).group(1)
    assert base.startswith(RAY_VERSION + "-"), base
    images = set()
    for spec in _cluster_specs():
        for c in spec["headGroupSpec"]["template"]["spec"]["containers"]:
            images.add(c["image"])
        for g in spec["workerGroupSpecs"]:
            images.update(c["image"] for c in g["template"]["spec"]["containers"])
    images.add(yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())["docker"]["image"])
    assert len(images) == 1, images


def test_no_credentials_in_deployment_files():
    for path in INFRA.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key\s*[:=]", text, re.I), path


def test_every_yaml_file_parses():
    paths = sorted(INFRA.rglob("*.yaml")) + sorted(INFRA.rglob("*.yml"))
    assert {p.relative_to(INFRA).as_posix() for p in paths} >= {
        "aws/cluster.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml"}
    for path in paths:
        assert _docs(path), path


def _entrypoints():
    """(file, module, args) for every `python -m` command written in infra/."""
    for path in sorted(INFRA.rglob("*")):
        if path.is_file():
            for m in ENTRYPOINT.finditer(path.read_text()):
                yield path, m.group(1), m.group(2).split()


def _module_exists(module: str) -> bool:
    base = REPO.joinpath(*module.split("."))
    return base.with_suffix(".py").is_file() or (base / "__main__.py").is_file()


def _repo_file_or_placeholder(arg: str) -> bool:
    return (REPO / arg).is_file() or PLACEHOLDER.fullmatch(arg) is not None


def test_entrypoints_name_repo_modules_and_files_on_gpu_workers():
    from pipeline.manifest import load_manifest

    found = list(_entrypoints())
    rayjob = _docs(INFRA / "kuberay" / "rayjob.yaml")[0]["spec"]["entrypoint"]
    assert ENTRYPOINT.fullmatch(rayjob), rayjob
    assert {p.relative_to(INFRA).as_posix() for p, _, _ in found} >= {
        "aws/cluster.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml"}
    for path, module, args in found:
        where = f"{path.relative_to(REPO)}: python -m {module} {' '.join(args)}"
        assert _module_exists(module), where
        if module != "jobs.generate":
            continue
        overrides = [a for a in args if "=" in a and not a.startswith("-")]
        positional = [a for a in args if "=" not in a and not a.startswith("-")]
        manifest, config = positional[0], None
        if "--config" in args:
            config = args[args.index("--config") + 1]
            assert _repo_file_or_placeholder(config), where
            positional.remove(config)
        assert positional == [manifest] and _repo_file_or_placeholder(manifest), where
        # GPU clusters scale from zero: with model.device=auto a job that starts first takes CPU workers
        assert "model.device=cuda" in overrides, where
        if (REPO / manifest).is_file() and (config is None or (REPO / config).is_file()):
            m = load_manifest(REPO / manifest, REPO / config if config else None, overrides)
            assert m.videos and m.base.model.device == "cuda", where
