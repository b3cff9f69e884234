"""infra/kuberay/ as the KubeRay operator and the API server read it: every manifest against
KubeRay's own CRD schemas (tests/data/kuberay, commit feeaf72f), token authentication through
spec.authOptions (what the operator itself sends to the dashboard), the ServiceAccount and Secret
the pods reference, a memory-backed /dev/shm on every Ray pod, and the RayJobs' lifecycle fields."""

import copy
import functools
import os
import re
import shlex

import pytest
import yaml
from jsonschema import Draft4Validator, FormatChecker, ValidationError, validators

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KUBERAY = os.path.join(ROOT, "infra", "kuberay")
DATA = os.path.join(ROOT, "tests", "data", "kuberay")
DOCS = os.path.join(ROOT, "docs", "scaling.md")
MANIFESTS = ["raycluster.yaml", "rayjob-pretrain.yaml", "rayjob-tune.yaml"]
RAYJOBS = ["rayjob-pretrain.yaml", "rayjob-tune.yaml"]
CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}

AUTH_SECRET, AUTH_KEY = "mae-ray-auth", "auth_token"  # KubeRay reads the token from key auth_token
SERVICE_ACCOUNT = "mae-ray"
# the one documented way to make the token Secret (quotes around $(...) allowed)
CREATE_AUTH_SECRET = re.compile(r"kubectl create secret generic mae-ray-auth\s+(?:\\\n\s*)?"
                                r"--from-literal=auth_token=\"?\$\(openssl rand -hex 32\)\"?")

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1-1.4 MB of YAML


def _text(path: str) -> str:
    with open(path) as f:
        return f.read()


def read(name: str) -> str:
    return _text(os.path.join(KUBERAY, name))


def load(name: str) -> dict:
    return yaml.safe_load(read(name))


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def _ray_pods(doc: dict):
    """(group, pod template) of every Ray pod: the head and each worker group."""
    spec = _cluster_spec(doc)
    yield "head", spec["headGroupSpec"]["template"]
    for g in spec["workerGroupSpecs"]:
        yield g["groupName"], g["template"]


def _all_pods(doc: dict):
    """Every pod template a manifest makes: the Ray pods plus a RayJob's submitter."""
    yield from _ray_pods(doc)
    if doc["kind"] == "RayJob" and doc["spec"].get("submitterPodTemplate"):
        yield "submitter", doc["spec"]["submitterPodTemplate"]


# ---------------------------------------------------------------- CRD schema -> JSON schema
# The API server validates a custom resource against the CRD's structural OpenAPI v3 schema:
# a field not declared under `properties` is pruned (or, with field validation Strict, the
# kubectl default, rejected) unless the node says x-kubernetes-preserve-unknown-fields or has
# additionalProperties. Here it is rejected. x-kubernetes-int-or-string means integer or string,
# nullable allows null, list-type map/set lists may not repeat a key, int32/int64 are ranges.
# Not evaluated: x-kubernetes-validations (CEL rules; none of them touch a field set here).

# The root `metadata` is an ObjectMeta the API server checks itself (the CRD says only `object`):
# the part of it a manifest sets.
OBJECT_META = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "generateName": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "finalizers": {"type": "array", "items": {"type": "string"}},
    },
}


def structural_to_jsonschema(node):
    if isinstance(node, list):
        return [structural_to_jsonschema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for k, v in node.items():
        if k == "description":
            continue
        if k == "properties":
            out[k] = {name: structural_to_jsonschema(sub) for name, sub in v.items()}
        elif k in ("items", "additionalProperties", "not") and isinstance(v, dict):
            out[k] = structural_to_jsonschema(v)
        elif k in ("allOf", "anyOf", "oneOf"):
            out[k] = [structural_to_jsonschema(x) for x in v]
        else:
            out[k] = v
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (node.get("type") == "object" and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False  # unknown fields: pruned / rejected by the API server
    if node.get("nullable"):
        if "type" in out:
            out["type"] = [out["type"], "null"]
        else:
            out = {"anyOf": [{"type": "null"}, out]}
    return out


def _list_type(validator, list_type, instance, schema):
    """x-kubernetes-list-type: map lists are keyed by x-kubernetes-list-map-keys (a missing key
    takes the schema's default, e.g. protocol TCP), set lists hold distinct items."""
    if not validator.is_type(instance, "array"):
        return
    if list_type == "set":
        seen = []
        for x in instance:
            if x in seen:
                yield ValidationError(f"duplicate item {x!r} in a list-type=set list")
            seen.append(x)
    elif list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        props = schema.get("items", {}).get("properties", {})
        seen = set()
        for x in instance:
            if not isinstance(x, dict):
                continue
            key = tuple(repr(x.get(k, props.get(k, {}).get("default"))) for k in keys)
            if key in seen:
                yield ValidationError(f"duplicate entry {dict(zip(keys, key))} in a list-type=map list")
            seen.add(key)


_formats = FormatChecker(formats=())
_formats.checks("int32")(lambda v: not isinstance(v, int) or -2**31 <= v < 2**31)
_formats.checks("int64")(lambda v: not isinstance(v, int) or -2**63 <= v < 2**63)

# OpenAPI v3.0 schema objects follow draft 4 (1.0 is not an integer, exclusiveMinimum is a flag)
K8sValidator = validators.extend(Draft4Validator, {"x-kubernetes-list-type": _list_type})


@functools.lru_cache(maxsize=None)
def crd_validator(kind: str):
    with open(os.path.join(DATA, CRDS[kind])) as f:
        crd = yaml.load(f, Loader=_Loader)
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind
    v1 = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = structural_to_jsonschema(v1["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = OBJECT_META
    schema["properties"]["apiVersion"] = {"enum": [f"{crd['spec']['group']}/v1"]}
    schema["properties"]["kind"] = {"enum": [kind]}
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    K8sValidator.check_schema(schema)
    return K8sValidator(schema, format_checker=_formats)


def schema_errors(doc: dict) -> list[str]:
    """Every way a custom resource fails its CRD's v1 schema, as 'path: message' lines."""
    if not isinstance(doc, dict) or doc.get("kind") not in CRDS:
        return [f"not a RayCluster or RayJob: {doc.get('kind') if isinstance(doc, dict) else doc!r}"]
    errs = crd_validator(doc["kind"]).iter_errors(doc)
    return sorted(f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}" for e in errs)


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_passes_kuberay_crd_schema(name):
    errors = schema_errors(load(name))
    assert not errors, f"{name} fails KubeRay's CRD schema:\n" + "\n".join(errors[:20])


def test_schema_check_accepts_kuberays_sample_and_rejects_what_the_api_server_rejects():
    with open(os.path.join(DATA, "sample-ray-cluster.auth.secret-ref.yaml")) as f:
        sample = next(d for d in yaml.safe_load_all(f) if d["kind"] == "RayCluster")
    assert schema_errors(sample) == []  # the operator's own sample passes

    base = load("raycluster.yaml")

    def broken(edit):
        doc = copy.deepcopy(base)
        edit(doc)
        return schema_errors(doc)

    unknown = broken(lambda d: d["spec"]["headGroupSpec"].update(bogus=1))
    assert any(e.startswith("spec.headGroupSpec:") and "'bogus'" in e for e in unknown), unknown
    # the embedded core types are checked too: a typo inside a container
    typo = broken(lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(resource={}))
    assert any("containers.0" in e and "'resource'" in e for e in typo), typo
    wrong_type = broken(lambda d: d["spec"]["workerGroupSpecs"][0].update(replicas="one"))
    assert any(e.startswith("spec.workerGroupSpecs.0.replicas:") for e in wrong_type), wrong_type
    as_float = broken(lambda d: d["spec"]["workerGroupSpecs"][0].update(maxReplicas=8.5))
    assert any("maxReplicas" in e for e in as_float), as_float
    too_big = broken(lambda d: d["spec"]["workerGroupSpecs"][0].update(maxReplicas=2**31))
    assert any("maxReplicas" in e and "int32" in e for e in too_big), too_big
    bad_enum = broken(lambda d: d["spec"].update(authOptions={"mode": "tokens"}))
    assert any(e.startswith("spec.authOptions.mode:") for e in bad_enum), bad_enum
    bad_quantity = broken(lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
                          ["resources"]["limits"].update(memory="32 GB"))
    assert any("limits.memory" in e for e in bad_quantity), bad_quantity
    dup_env = broken(lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
                     .setdefault("env", []).extend([{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]))
    assert any("duplicate" in e and "env" in e for e in dup_env), dup_env
    bad_meta = broken(lambda d: d["metadata"].update(labels={"app": 1}))
    assert any(e.startswith("metadata.labels.app:") for e in bad_meta), bad_meta
    # a RayJob field on a RayCluster: the two CRDs are not confused
    assert any("'backoffLimit'" in e for e in broken(lambda d: d["spec"].update(backoffLimit=2)))
    rayjob = copy.deepcopy(load("rayjob-pretrain.yaml"))
    rayjob["spec"]["backoffLimit"] = "2"
    rayjob["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["envv"] = []
    gpu_pod = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    gpu_pod["volumes"][0]["emptyDir"]["size"] = "1Gi"
    errors = schema_errors(rayjob)
    assert any(e.startswith("spec.backoffLimit:") for e in errors), errors
    assert any(e.startswith("spec.submitterPodTemplate.spec.containers.0:") and "'envv'" in e for e in errors), errors
    assert any("volumes.0.emptyDir:" in e and "'size'" in e for e in errors), errors


def test_structural_schema_rules():
    """The OpenAPI v3 extensions the API server honours, on a small schema of their own."""
    schema = structural_to_jsonschema({
        "type": "object",
        "properties": {
            "closed": {"type": "object", "properties": {"a": {"type": "string"}}},
            "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                     "properties": {"a": {"type": "string"}}},
            "map": {"type": "object", "additionalProperties": {"type": "integer"}},
            "qty": {"x-kubernetes-int-or-string": True},
            "when": {"type": "string", "nullable": True},
            "ports": {"type": "array", "x-kubernetes-list-type": "map",
                      "x-kubernetes-list-map-keys": ["port", "protocol"],
                      "items": {"type": "object", "properties": {
                          "port": {"type": "integer", "format": "int32"},
                          "protocol": {"type": "string", "default": "TCP"}}}},
        },
    })
    v = K8sValidator(schema, format_checker=_formats)
    ok = {"closed": {"a": "x"}, "open": {"a": "x", "anything": {"at": ["all"]}}, "map": {"k": 1},
          "qty": 3, "when": None, "ports": [{"port": 80}, {"port": 80, "protocol": "UDP"}]}
    assert list(v.iter_errors(ok)) == []
    assert v.is_valid({"qty": "3Gi"})
    for bad in ({"closed": {"a": "x", "b": 1}}, {"extra": 1}, {"open": {"a": 1}}, {"map": {"k": "1"}},
                {"qty": 1.5}, {"qty": None}, {"when": 1}, {"ports": [{"port": 80}, {"port": 80, "protocol": "TCP"}]},
                {"ports": [{"port": 2**31}]}):
        assert not v.is_valid(bad), bad


# ---------------------------------------------------------------- token authentication
# KubeRay (controllers/ray/utils/util.go, GetRayDashboardClientFunc) sends a bearer token on its own
# calls to the dashboard (RayJob submission, status polls) only when spec.authOptions.mode is
# token, read from Secret authOptions.secretName (else one it generates), key auth_token. With
# token mode it also gives RAY_AUTH_MODE / RAY_AUTH_TOKEN from that Secret to the Ray container of
# every pod, the autoscaler sidecar, the wait-gcs-ready init container and the RayJob submitter
# (common/pod.go SetContainerTokenAuthEnvVars), unless a container already sets the variable.

def _operator_token_env(container_env, auth: dict, cluster_name: str) -> list:
    """What SetContainerTokenAuthEnvVars leaves in a container's env (secret-token mode)."""
    env = list(container_env or [])
    names = {e["name"] for e in env}
    if "RAY_AUTH_MODE" not in names:
        env.append({"name": "RAY_AUTH_MODE", "value": "token"})
    if "RAY_AUTH_TOKEN" not in names:
        secret = auth.get("secretName") or cluster_name
        env.append({"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": secret, "key": AUTH_KEY}}})
    return env


def _auth_env_of(env: list, where: str) -> tuple:
    by = {}
    for e in env:
        assert e["name"] not in by, f"{where}: {e['name']} set twice"
        by[e["name"]] = e
    assert by.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where}: RAY_AUTH_MODE is not token"
    tok = by.get("RAY_AUTH_TOKEN", {})
    assert "value" not in tok, f"{where}: RAY_AUTH_TOKEN is a literal"
    ref = tok.get("valueFrom", {}).get("secretKeyRef", {})
    return ref.get("name"), ref.get("key")


@pytest.mark.parametrize("name", MANIFESTS)
def test_operator_itself_authenticates_with_the_clusters_token(name):
    doc = load(name)
    spec = _cluster_spec(doc)
    auth = spec.get("authOptions")
    assert auth == {"mode": "token", "secretName": AUTH_SECRET}, (
        f"{name}: without authOptions {{mode: token, secretName: {AUTH_SECRET}}} the operator calls the "
        f"dashboard without a token (401): a RayJob never sees its job end. Got {auth!r}")
    version = tuple(int(x) for x in spec["rayVersion"].split(".")[:3])
    assert version >= (2, 52, 0), "KubeRay refuses token mode below Ray 2.52"

    # After the operator's injection every Ray process reads the token the operator sends
    cluster = doc["metadata"]["name"]
    where_env = []
    for group, pod in _ray_pods(doc):
        ray_container = pod["spec"]["containers"][0]  # KubeRay's RayContainerIndex
        where_env.append((f"{group}/{ray_container['name']}", ray_container.get("env")))
    if spec.get("enableInTreeAutoscaling"):
        # the operator's entries first, then autoscalerOptions.env appended (mergeAutoscalerOverrides)
        where_env.append(("autoscaler", spec.get("autoscalerOptions", {}).get("env")))
    if doc["kind"] == "RayJob" and doc["spec"].get("submitterPodTemplate"):
        where_env.append(("submitter", doc["spec"]["submitterPodTemplate"]["spec"]["containers"][0].get("env")))
    for where, env in where_env:
        hand_set = [e["name"] for e in env or [] if e["name"].startswith("RAY_AUTH")]
        # where the operator injects, a hand-set copy only risks naming another secret (and in
        # autoscalerOptions.env it would be a second entry after the operator's)
        assert not hand_set, f"{name} {where}: {hand_set} set by hand; authOptions gives them"
        if where == "autoscaler":
            final = _operator_token_env([], auth, cluster) + list(env or [])
        else:
            final = _operator_token_env(env, auth, cluster)
        assert _auth_env_of(final, f"{name} {where}") == (AUTH_SECRET, AUTH_KEY)
    # containers the operator does not inject into (other sidecars) need the token by hand
    for group, pod in _all_pods(doc):
        for c in pod["spec"]["containers"][1:]:
            if any(e["name"].startswith("RAY_") for e in c.get("env", [])):
                assert _auth_env_of(c.get("env", []), f"{name} {group}/{c['name']}") == (AUTH_SECRET, AUTH_KEY)


def test_docs_tell_the_kuberay_token_setup_the_operator_reads():
    docs = _text(DOCS)
    assert "secretName: mae-ray-auth" in docs and "authOptions" in docs
    assert CREATE_AUTH_SECRET.search(docs), "docs/scaling.md: no `kubectl create secret generic mae-ray-auth ...`"
    assert "serviceaccount.yaml" in docs
    # the old advice, token variables by hand and "check that your operator sends it", is gone
    assert "Either use that instead of the env entries" not in docs


# ---------------------------------------------------------------- what the pods reference

def _shipped(kind: str) -> set:
    names = set()
    for f in sorted(os.listdir(KUBERAY)):
        if f.endswith((".yaml", ".yml")):
            for d in yaml.safe_load_all(read(f)):
                if isinstance(d, dict) and d.get("kind") == kind and d.get("apiVersion") == "v1":
                    names.add(d["metadata"]["name"])
    return names


def _header(text: str) -> str:
    """The comment block a manifest starts with."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# "))
    return "\n".join(lines)


def _secret_refs(doc: dict) -> list:
    """(secret name, optional, where) of every Secret the pods or the operator read."""
    refs = []
    auth = _cluster_spec(doc).get("authOptions") or {}
    if auth.get("mode") == "token":  # the operator reads it and gives it to every Ray container
        refs.append((auth.get("secretName") or doc["metadata"]["name"], False, "authOptions"))

    def walk(node, where):
        if isinstance(node, dict):
            for key in ("secretKeyRef", "secretRef"):
                if isinstance(node.get(key), dict):
                    refs.append((node[key]["name"], bool(node[key].get("optional")), where))
            if isinstance(node.get("secret"), dict) and "secretName" in node["secret"]:  # a volume
                refs.append((node["secret"]["secretName"], bool(node["secret"].get("optional")), where))
            for k, v in node.items():
                walk(v, f"{where}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]")
    walk(doc["spec"], "spec")
    return refs


@pytest.mark.parametrize("name", MANIFESTS)
def test_every_service_account_and_secret_a_pod_references_is_shipped_or_documented(name):
    doc = load(name)
    header = _header(read(name))
    docs = _text(DOCS)
    accounts = _shipped("ServiceAccount")
    for group, pod in _all_pods(doc):
        sa = pod["spec"].get("serviceAccountName")
        assert sa is None or sa in accounts, f"{name} {group}: ServiceAccount {sa} is not in infra/kuberay/"
    secrets = _shipped("Secret")
    refs = _secret_refs(doc)
    assert (AUTH_SECRET, False, "authOptions") in refs
    for secret, optional, where in refs:
        if secret in secrets:
            continue
        if optional:  # e.g. mae-object-storage: only for stores without roles, and said so
            assert secret in docs, f"{name} {where}: optional Secret {secret} is not in docs/scaling.md"
            continue
        created = re.compile(rf"kubectl create secret generic {re.escape(secret)}\b")
        assert created.search(header), f"{name} {where}: how to create Secret {secret} is not in its header"
        assert created.search(docs), f"{name} {where}: how to create Secret {secret} is not in docs/scaling.md"
    assert CREATE_AUTH_SECRET.search(header), f"{name}: header lacks the mae-ray-auth creation command"
    assert SERVICE_ACCOUNT in header and "serviceaccount.yaml" in header


# The core/v1 ServiceAccount fields (k8s.io/api/core/v1 ServiceAccount); no CRD embeds it.
SERVICE_ACCOUNT_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata"],
    "properties": {
        "apiVersion": {"enum": ["v1"]},
        "kind": {"enum": ["ServiceAccount"]},
        "metadata": OBJECT_META,
        "automountServiceAccountToken": {"type": "boolean"},
        "imagePullSecrets": {"type": "array", "items": {"type": "object", "additionalProperties": False,
                                                          "properties": {"name": {"type": "string"}}}},
        "secrets": {"type": "array", "items": {"type": "object"}},
    },
}


def test_service_account_manifest_carries_the_storage_role_annotations():
    path = os.path.join(KUBERAY, "serviceaccount.yaml")
    assert os.path.exists(path), "infra/kuberay/serviceaccount.yaml is missing"
    docs = [d for d in yaml.safe_load_all(read("serviceaccount.yaml")) if d]
    sa = [d for d in docs if d.get("kind") == "ServiceAccount"]
    assert len(sa) == 1 and sa[0]["metadata"]["name"] == SERVICE_ACCOUNT
    errors = sorted(e.message for e in K8sValidator(SERVICE_ACCOUNT_SCHEMA).iter_errors(sa[0]))
    assert not errors, errors
    ann = sa[0]["metadata"].get("annotations", {})
    assert re.fullmatch(r"arn:aws:iam::\S+:role/\S+", ann.get("eks.amazonaws.com/role-arn", "")), ann  # EKS IRSA
    assert re.fullmatch(r"\S+@\S+\.iam\.gserviceaccount\.com", ann.get("iam.gke.io/gcp-service-account", "")), ann
    assert "AccessKey" not in read("serviceaccount.yaml")  # roles, never keys


# ---------------------------------------------------------------- /dev/shm

def _ray_default_object_store(memory_limit_bytes: int, shm_bytes: int) -> int:
    """Ray's default object store size (ray/_private/utils.py resolve_object_store_memory, Linux)."""
    from ray._private import ray_constants as rc
    cap = min(rc.DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES, max(rc.REQUIRE_SHM_SIZE_THRESHOLD, int(shm_bytes * 0.95)))
    return min(int(memory_limit_bytes * rc.DEFAULT_OBJECT_STORE_MEMORY_PROPORTION), cap)


def _bytes(quantity) -> int:
    m = re.fullmatch(r"(\d+)([KMGTP]i)?", str(quantity))
    assert m, f"quantity {quantity!r}"
    return int(m.group(1)) * 1024 ** (" KMGTP".index(m.group(2)[0]) if m.group(2) else 0)


@pytest.mark.parametrize("name", MANIFESTS)
def test_every_ray_pod_mounts_a_memory_backed_dev_shm(name):
    """Ray's object store lives in /dev/shm. A container's own /dev/shm is 64 MiB, so without a
    memory-backed volume Ray puts the object store in /tmp, on disk."""
    for group, pod in _ray_pods(load(name)):
        spec = pod["spec"]
        ray_container = spec["containers"][0]
        mounts = {m["mountPath"]: m["name"] for m in ray_container.get("volumeMounts", [])}
        assert "/dev/shm" in mounts, f"{name} {group}: no volume at /dev/shm"
        vol = next((v for v in spec.get("volumes", []) if v["name"] == mounts["/dev/shm"]), None)
        assert vol is not None, f"{name} {group}: /dev/shm mounts volume {mounts['/dev/shm']}, which is not declared"
        empty = vol.get("emptyDir") or {}
        assert empty.get("medium") == "Memory" and empty.get("sizeLimit"), f"{name} {group}: {vol}"
        shm = _bytes(empty["sizeLimit"])
        mem = _bytes(ray_container["resources"]["limits"]["memory"])
        assert shm < mem, f"{name} {group}: /dev/shm counts against the pod's memory limit"
        store = _ray_default_object_store(mem, shm)
        assert store <= shm, f"{name} {group}: Ray's default object store ({store / 2**30:.1f} GiB) does not fit"


# ---------------------------------------------------------------- RayJob lifecycle

def _commented(text: str, key: str) -> bool:
    """`key:` at spec level carries a comment on its line or the line above."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(rf"  {key}:", line):
            return "#" in line or (i > 0 and lines[i - 1].strip().startswith("#"))
    return False


@pytest.mark.parametrize("name", RAYJOBS)
def test_rayjob_lifecycle_is_bounded_and_retries_resume(name):
    text, doc = read(name), load(name)
    s = doc["spec"]
    for key in ("activeDeadlineSeconds", "backoffLimit", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished"):
        assert key in s, f"{name}: spec.{key} is not set"
        assert _commented(text, key), f"{name}: spec.{key} has no comment saying why"
    assert isinstance(s["activeDeadlineSeconds"], int) and s["activeDeadlineSeconds"] > 0
    assert isinstance(s["backoffLimit"], int) and s["backoffLimit"] >= 1
    assert s["shutdownAfterJobFinishes"] is True
    assert isinstance(s["ttlSecondsAfterFinished"], int) and s["ttlSecondsAfterFinished"] > 0
    # each retry is a new RayCluster: it resumes only from storage every cluster sees
    argv = shlex.split(s["entrypoint"])
    storage = [a.split("=", 1)[1] for a in argv if a.startswith("run.storage_path=")]
    assert storage and re.match(r"^(s3|gs|gcs|abfs)://", storage[0]), f"{name}: storage_path {storage}"
