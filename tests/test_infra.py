"""infra/: the launcher config against Ray's own schema, KubeRay manifests structurally, every
entrypoint they name runs with --help, and versions agree with pyproject.toml."""

import os
import re
import shlex
import subprocess
import sys
import tomllib

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFRA = os.path.join(ROOT, "infra")
MANIFESTS = ["raycluster.yaml", "rayjob-pretrain.yaml", "rayjob-tune.yaml"]


def load(*parts):
    with open(os.path.join(INFRA, *parts)) as f:
        return yaml.safe_load(f)


def pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def test_cluster_launcher_config_passes_ray_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config
    cfg = load("cluster", "aws.yaml")
    prepared = prepare_config(cfg)  # fills defaults the way `ray up` does before validating
    validate_config(prepared)
    broken = yaml.safe_load(yaml.safe_dump(cfg))
    broken["available_node_types"]["gpu_h100"]["max_workers"] = "eight"
    with pytest.raises(Exception):  # the schema really is checked
        validate_config(prepare_config(broken))
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"]["CPU"] == 0  # the head runs no training
    assert {"gpu_h100", "cpu_decode"} <= set(types)
    for name, t in types.items():
        assert "AccessKey" not in str(t) and "SecretKey" not in str(t)  # roles, never keys
        if name != cfg["head_node_type"]:
            assert t["max_workers"] >= t["min_workers"] >= 0


def _cluster_specs(doc):
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


@pytest.mark.parametrize("name", MANIFESTS)
def test_kuberay_manifest_structure(name):
    doc = load("kuberay", name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayCluster", "RayJob")
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    spec = _cluster_specs(doc)
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert head["rayStartParams"].get("num-cpus") == "0"
    groups = spec["workerGroupSpecs"]
    assert {g["groupName"] for g in groups} == {"gpu-h100", "cpu-decode"}
    for pod in [head["template"], *[g["template"] for g in groups]]:
        c = pod["spec"]["containers"]
        assert c and all(x["image"] and x["name"] for x in c)
        assert all("env" not in x or all("value" not in e or "SECRET" not in e["name"] for e in x["env"]) for x in c)
    for g in groups:
        assert isinstance(g["rayStartParams"], dict)
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    gpu = next(g for g in groups if g["groupName"] == "gpu-h100")
    assert gpu["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    if doc["kind"] == "RayJob":
        s = doc["spec"]
        assert s["shutdownAfterJobFinishes"] is True and s["ttlSecondsAfterFinished"] > 0
        assert s["entrypoint"].startswith("python -m jobs.")


def _entrypoints():
    out = []
    for name in MANIFESTS:
        doc = load("kuberay", name)
        if doc["kind"] == "RayJob":
            argv = shlex.split(doc["spec"]["entrypoint"])
            out.append(argv[:3])  # python -m jobs.X
    return out


@pytest.mark.parametrize("argv", _entrypoints(), ids=lambda a: a[2])
def test_every_entrypoint_runs_with_help(argv):
    r = subprocess.run([sys.executable, *argv[1:], "--help"], capture_output=True, text=True, timeout=120,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage" in r.stdout.lower()


def test_images_and_versions_agree_with_pyproject():
    import ray
    proj = pyproject()
    version = proj["version"]
    dockerfile = open(os.path.join(INFRA, "docker", "Dockerfile")).read()
    ray_version = re.search(r"ARG RAY_VERSION=(\S+)", dockerfile).group(1)
    py_tag = re.search(r"ARG PYTHON_TAG=py(\d)(\d+)", dockerfile)
    torch_v = re.search(r"ARG TORCH_VERSION=(\S+)", dockerfile).group(1)
    assert ray_version == ray.__version__  # the image's Ray is the one the project is tested with
    ray_dep = next(d for d in proj["dependencies"] if d.startswith("ray["))
    lo, hi = re.search(r">=([\d.]+),<([\d.]+)", ray_dep).groups()
    as_tuple = lambda v: tuple(int(x) for x in v.split("."))  # noqa: E731
    assert as_tuple(lo) <= as_tuple(ray_version) < as_tuple(hi)
    req_py = re.search(r">=(\d+)\.(\d+)", proj["requires-python"]).groups()
    assert (int(py_tag.group(1)), int(py_tag.group(2))) >= (int(req_py[0]), int(req_py[1]))
    torch_dep = next(d for d in proj["dependencies"] if d.startswith("torch>"))
    assert as_tuple(torch_v) < as_tuple(re.search(r"<([\d.]+)", torch_dep).group(1))
    images = set(re.findall(r"REGISTRY/ray-mae:(\S+?)-(gpu|cpu)", open(os.path.join(INFRA, "cluster", "aws.yaml")).read()))
    for name in MANIFESTS:
        images |= set(re.findall(r"REGISTRY/ray-mae:(\S+?)-(gpu|cpu)", open(os.path.join(INFRA, "kuberay", name)).read()))
    assert images and {tag for tag, _ in images} == {version}
    for name in MANIFESTS:
        doc = load("kuberay", name)
        assert _cluster_specs(doc)["rayVersion"] == ray_version
