"""Deployment files: the cluster launcher YAML passes Ray's own validator; KubeRay and Docker files
agree with each other and with the Ray version the project runs."""

import re
from pathlib import Path

import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

INFRA = Path(__file__).resolve().parent.parent / "infra"
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
