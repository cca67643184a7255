"""The KubeRay manifests in cluster/kuberay/: CRD schema validation plus the project's own rules.

Every document of every ``cluster/kuberay/*.yaml`` is validated against the ``openAPIV3Schema`` of
version ``v1`` of the KubeRay CRD of its kind (RayJob / RayCluster), with jsonschema's Draft 7
validator. Kubernetes' structural schemas are not plain JSON Schema, so they are translated first:

- ``x-kubernetes-int-or-string: true``: integer or string (``pattern`` still applies to strings);
- objects with ``properties`` and no ``additionalProperties`` are closed, as the API server's
  strict field validation (kubectl's default) rejects unknown fields instead of dropping them;
  ``x-kubernetes-preserve-unknown-fields`` keeps an object open; ``nullable`` admits null;
- ``x-kubernetes-list-type: map`` / ``set``: unique ``x-kubernetes-list-map-keys`` (defaults applied) /
  unique items; ``atomic`` needs nothing;
- ``x-kubernetes-validations`` (CEL): the rules these CRDs carry are evaluated in Python; a rule this
  file does not know fails validation instead of passing unseen;
- ``format: int32`` / ``int64``: range checks.

The CRDs are read from ``$AURORA_KUBERAY_CRDS`` if set, else from ``<repo>/../shared/kuberay-crds``,
else from the copy in ``cluster/kuberay/crds``;
if none exists the tests fail (they do not skip).
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shlex
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
MANIFEST_DIR = REPO_ROOT / "cluster" / "kuberay"
PVC_FILE = REPO_ROOT / "cluster" / "pvc.yaml"
CRD_ENV = "AURORA_KUBERAY_CRDS"
DEFAULT_CRD_DIR = REPO_ROOT.parent / "shared" / "kuberay-crds"
VENDORED_CRD_DIR = REPO_ROOT / "cluster" / "kuberay" / "crds"  # the same files, kept in the repository

STAGES = ("prepare-data", "teacher", "sft", "reflect", "grpo", "evaluate")
SHARED_MOUNT = "/mnt/shared"
RUN_ROOT = "/mnt/shared/runs"
GPU = "nvidia.com/gpu"
# KubeRay's own limits (ray-operator/controllers/ray/utils/constant.go): a RayJob's name plus a
# 6-character suffix names its RayCluster.
MAX_NAME = {"RayCluster": 53, "RayJob": 47}
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# --------------------------------------------------------------------------------------------------
# Manifests


def _load_manifests() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(MANIFEST_DIR.glob("*.yaml")):
        with open(path) as f:
            for i, doc in enumerate(yaml.load_all(f, Loader=_Loader)):
                if doc is not None:
                    docs.append((f"{path.name}#{i}", doc))
    return docs


MANIFESTS = _load_manifests()
RAYJOBS = [(k, d) for k, d in MANIFESTS if d.get("kind") == "RayJob"]
RAYCLUSTERS = [(k, d) for k, d in MANIFESTS if d.get("kind") == "RayCluster"]


def _ids(items: list[tuple[str, Any]]) -> list[str]:
    return [k for k, _ in items]


def _cluster_specs() -> list[tuple[str, dict]]:
    """Every RayCluster spec: the RayClusters' and the RayJobs' inline rayClusterSpec."""
    specs = [(k, d["spec"]) for k, d in RAYCLUSTERS]
    specs += [(k, d["spec"]["rayClusterSpec"]) for k, d in RAYJOBS if "rayClusterSpec" in d.get("spec", {})]
    return specs


CLUSTER_SPECS = _cluster_specs()


def _pod_specs(cluster_spec: dict) -> Iterator[tuple[str, dict]]:
    yield "head", cluster_spec["headGroupSpec"]["template"]["spec"]
    for g in cluster_spec.get("workerGroupSpecs", []):
        yield g["groupName"], g["template"]["spec"]


def _ray_container(pod_spec: dict) -> dict:
    return pod_spec["containers"][0]  # KubeRay runs Ray in the first container


def _limits(container: dict) -> dict:
    res = container.get("resources", {})
    return {**res.get("requests", {}), **res.get("limits", {})}


def _runtime_env(job: dict) -> dict:
    text = job["spec"].get("runtimeEnvYAML")
    return {} if text is None else yaml.safe_load(text)


# --------------------------------------------------------------------------------------------------
# CRD schemas -> JSON Schema


def _crd_dir() -> Path:
    env = os.environ.get(CRD_ENV)
    if env:
        d = Path(env)
        if not d.is_dir():
            pytest.fail(f"{CRD_ENV}={env} is not a directory holding the KubeRay CRDs")
        return d
    for d in (DEFAULT_CRD_DIR, VENDORED_CRD_DIR):
        if (d / "ray.io_rayjobs.yaml").is_file() and (d / "ray.io_rayclusters.yaml").is_file():
            return d
    pytest.fail(
        f"KubeRay CRDs not found at {DEFAULT_CRD_DIR} nor {VENDORED_CRD_DIR}: set {CRD_ENV} to a directory "
        "holding ray.io_rayjobs.yaml and ray.io_rayclusters.yaml (from ray-project/kuberay, "
        "ray-operator/config/crd/bases)"
    )


def test_vendored_crds_equal_the_shared_ones():
    """cluster/kuberay/crds is a copy for clones without ../shared; it must not drift from it."""
    if not DEFAULT_CRD_DIR.is_dir():
        pytest.skip(f"no {DEFAULT_CRD_DIR} beside this clone to compare with")
    for name in ("ray.io_rayjobs.yaml", "ray.io_rayclusters.yaml"):
        assert (VENDORED_CRD_DIR / name).read_bytes() == (DEFAULT_CRD_DIR / name).read_bytes(), name


def _to_jsonschema(s: dict) -> dict:
    """One Kubernetes structural-schema node (and its children) as Draft 7 JSON Schema."""
    s = dict(s)
    if "properties" in s:
        s["properties"] = {k: _to_jsonschema(v) for k, v in s["properties"].items()}
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = _to_jsonschema(s["additionalProperties"])
    if isinstance(s.get("items"), dict):
        s["items"] = _to_jsonschema(s["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in s:
            s[key] = [_to_jsonschema(x) for x in s[key]]
    if isinstance(s.get("not"), dict):
        s["not"] = _to_jsonschema(s["not"])

    if s.get("x-kubernetes-int-or-string"):
        s.pop("type", None)
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if s.get("nullable") and isinstance(s.get("type"), str):
        s["type"] = [s["type"], "null"]
    if s.get("x-kubernetes-embedded-resource"):
        s.setdefault("properties", {})
        for field, typ in (("apiVersion", "string"), ("kind", "string"), ("metadata", "object")):
            s["properties"].setdefault(field, {"type": typ})
    if ("properties" in s and "additionalProperties" not in s
            and not s.get("x-kubernetes-preserve-unknown-fields")):
        s["additionalProperties"] = False
    return s


def _has(obj: Any, field: str) -> bool:
    return isinstance(obj, dict) and field in obj


# The CEL rules of these CRDs, evaluated on a new object. Transition rules (oldSelf) hold on create.
CEL_RULES = {
    "self == oldSelf": lambda s: True,
    "self in ['ray.io/kuberay-operator', 'kueue.x-k8s.io/multikueue']":
        lambda s: s in ("ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"),
    "!(has(self.jobStatus) && has(self.jobDeploymentStatus))":
        lambda s: not (_has(s, "jobStatus") and _has(s, "jobDeploymentStatus")),
    "has(self.jobStatus) || has(self.jobDeploymentStatus)":
        lambda s: _has(s, "jobStatus") or _has(s, "jobDeploymentStatus"),
    "!((has(self.onSuccess) || has(self.onFailure)) && has(self.deletionRules))":
        lambda s: not ((_has(s, "onSuccess") or _has(s, "onFailure")) and _has(s, "deletionRules")),
    "((has(self.onSuccess) && has(self.onFailure)) || has(self.deletionRules))":
        lambda s: (_has(s, "onSuccess") and _has(s, "onFailure")) or _has(s, "deletionRules"),
}


def _cel(validator, rules, instance, schema):
    for rule in rules:
        check = CEL_RULES.get(rule["rule"])
        if check is None:
            yield jsonschema.ValidationError(
                f"CEL rule {rule['rule']!r} is not evaluated by this test: add it to CEL_RULES")
        elif not check(instance):
            yield jsonschema.ValidationError(rule.get("message", f"violates CEL rule {rule['rule']!r}"))


def _list_type(validator, list_type, instance, schema):
    if not isinstance(instance, list):
        return
    if list_type == "set":
        seen = []
        for item in instance:
            if item in seen:
                yield jsonschema.ValidationError(f"duplicate item {item!r} in a list of type set")
            seen.append(item)
    elif list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        item_props = schema.get("items", {}).get("properties", {})
        seen = set()
        for item in instance:
            if not isinstance(item, dict):
                continue
            key = tuple(repr(item.get(k, item_props.get(k, {}).get("default"))) for k in keys)
            if key in seen:
                yield jsonschema.ValidationError(
                    f"duplicate entry for keys {keys} = {key} in a list of type map")
            seen.add(key)


FORMATS = jsonschema.FormatChecker()
FORMATS.checks("int32")(lambda v: not isinstance(v, int) or -2**31 <= v < 2**31)
FORMATS.checks("int64")(lambda v: not isinstance(v, int) or -2**63 <= v < 2**63)

K8sValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator,
    {"x-kubernetes-validations": _cel, "x-kubernetes-list-type": _list_type},
)


@functools.lru_cache(maxsize=None)
def _validators(crd_dir: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for path in sorted(Path(crd_dir).glob("*.yaml")):
        with open(path) as f:
            for doc in yaml.load_all(f, Loader=_Loader):
                if not doc or doc.get("kind") != "CustomResourceDefinition":
                    continue
                if doc["spec"]["group"] != "ray.io":
                    continue
                kind = doc["spec"]["names"]["kind"]
                v1 = [v for v in doc["spec"]["versions"] if v["name"] == "v1"]
                if v1:
                    schema = _to_jsonschema(v1[0]["schema"]["openAPIV3Schema"])
                    K8sValidator.check_schema(schema)
                    found[kind] = K8sValidator(schema, format_checker=FORMATS)
    missing = {"RayJob", "RayCluster"} - set(found)
    if missing:
        pytest.fail(f"no v1 CRD for {sorted(missing)} in {crd_dir}")
    return found


@pytest.fixture(scope="module")
def validators() -> dict[str, Any]:
    return _validators(str(_crd_dir()))


def _errors(validators: dict[str, Any], doc: dict) -> list[str]:
    errors = sorted(validators[doc["kind"]].iter_errors(doc), key=lambda e: list(e.absolute_path))
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


# --------------------------------------------------------------------------------------------------
# Schema


def test_the_manifests_are_there():
    names = {p.name for p in MANIFEST_DIR.glob("*.yaml")}
    assert "raycluster.yaml" in names
    assert {f"rayjob-{s}.yaml" for s in STAGES} <= names, sorted(names)
    assert len(RAYCLUSTERS) >= 1 and len(RAYJOBS) >= len(STAGES)


@pytest.mark.parametrize("key,doc", MANIFESTS, ids=_ids(MANIFESTS))
def test_api_version_and_kind(key, doc):
    assert doc.get("apiVersion") == "ray.io/v1", key
    assert doc.get("kind") in ("RayJob", "RayCluster"), key


@pytest.mark.parametrize("key,doc", MANIFESTS, ids=_ids(MANIFESTS))
def test_manifest_matches_crd_schema(validators, key, doc):
    errors = _errors(validators, doc)
    assert not errors, f"{key} does not match the {doc['kind']} CRD:\n" + "\n".join(errors)


@pytest.mark.parametrize("key,doc", MANIFESTS, ids=_ids(MANIFESTS))
def test_names_are_valid_for_kuberay(key, doc):
    name = doc["metadata"]["name"]
    assert DNS1035.match(name), f"{key}: {name!r} is not a DNS-1035 label"
    assert len(name) <= MAX_NAME[doc["kind"]], f"{key}: {name!r} is longer than KubeRay allows"


def _mutated(doc: dict, mutate) -> dict:
    doc = copy.deepcopy(doc)
    mutate(doc)
    return doc


def _cluster(doc):
    return doc["spec"]


def _gpu_group(doc):
    return next(g for g in doc["spec"]["workerGroupSpecs"] if GPU in _limits(_ray_container(g["template"]["spec"])))


# what -> (how to break a valid manifest, a fragment of the error it must cause)
BROKEN_CLUSTERS = {
    "wrong type (maxReplicas as a word)": (
        lambda d: _gpu_group(d).update(maxReplicas="four"), "is not of type 'integer'"),
    "missing required headGroupSpec": (
        lambda d: _cluster(d).pop("headGroupSpec"), "'headGroupSpec' is a required property"),
    "missing required groupName": (
        lambda d: _gpu_group(d).pop("groupName"), "'groupName' is a required property"),
    "unknown field (misspelt workerGroupSpecs)": (
        lambda d: _cluster(d).update(workerGroupSpec=_cluster(d).pop("workerGroupSpecs")),
        "'workerGroupSpec' was unexpected"),
    "rayStartParams value not a string": (
        lambda d: _cluster(d)["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
        "is not of type 'string'"),
    "quantity that is not one": (
        lambda d: _ray_container(_gpu_group(d)["template"]["spec"])["resources"]["limits"].update(memory="lots"),
        "'lots' does not match"),
    "duplicate container name (list-type map)": (
        lambda d: _gpu_group(d)["template"]["spec"]["containers"].append(
            copy.deepcopy(_ray_container(_gpu_group(d)["template"]["spec"]))),
        "in a list of type map"),
    "int32 out of range": (lambda d: _gpu_group(d).update(maxReplicas=2**31), "is not a 'int32'"),
    "CEL rule (managedBy)": (
        lambda d: _cluster(d).update(managedBy="someone-else"), "the managedBy field value must be"),
}


@pytest.mark.parametrize("what", list(BROKEN_CLUSTERS))
def test_validator_rejects_a_broken_raycluster(validators, what):
    assert RAYCLUSTERS, "no RayCluster manifest to break"
    good = RAYCLUSTERS[0][1]
    assert not _errors(validators, good), "the unchanged manifest must pass first (test_manifest_matches_crd_schema)"
    mutate, expected = BROKEN_CLUSTERS[what]
    errors = _errors(validators, _mutated(good, mutate))
    assert any(expected in e for e in errors), f"{what}: expected an error with {expected!r}, got {errors}"


BROKEN_JOBS = {
    "wrong type (entrypoint as a number)": (
        lambda d: d["spec"].update(entrypoint=42), "is not of type 'string'"),
    "wrong type (shutdownAfterJobFinishes as a string)": (
        lambda d: d["spec"].update(shutdownAfterJobFinishes="yes"), "is not of type 'boolean'"),
    "unknown field": (
        lambda d: d["spec"].update(entryPoint=d["spec"]["entrypoint"]), "'entryPoint' was unexpected"),
    "CEL rule (deletionStrategy needs both policies)": (
        lambda d: d["spec"].update(deletionStrategy={"onSuccess": {"policy": "DeleteCluster"}}),
        "deletionStrategy requires either BOTH"),
}


@pytest.mark.parametrize("what", list(BROKEN_JOBS))
def test_validator_rejects_a_broken_rayjob(validators, what):
    assert RAYJOBS, "no RayJob manifest to break"
    good = RAYJOBS[0][1]
    assert not _errors(validators, good), "the unchanged manifest must pass first (test_manifest_matches_crd_schema)"
    mutate, expected = BROKEN_JOBS[what]
    errors = _errors(validators, _mutated(good, mutate))
    assert any(expected in e for e in errors), f"{what}: expected an error with {expected!r}, got {errors}"


def test_int_or_string_accepts_both(validators):
    good = RAYCLUSTERS[0][1]
    for value in (8, "8", "512Gi", "500m"):
        doc = _mutated(good, lambda d: _ray_container(_gpu_group(d)["template"]["spec"])["resources"][
            "limits"].update(cpu=value))
        assert not _errors(validators, doc), f"int-or-string rejected {value!r}"


# --------------------------------------------------------------------------------------------------
# RayJobs


def _script_flags(script: str) -> set[str]:
    """The --options a pipeline script declares (besides --config, which every script has)."""
    path = REPO_ROOT / script
    return set(re.findall(r'add_argument\("(--[\w-]+)"', path.read_text())) if path.is_file() else set()


def _entrypoint(job: dict) -> tuple[str, str, list[str]]:
    """(script, config, overrides) of ``python pipelines/<x>.py --config FILE [--opt V] key=value ...``."""
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] in ("python", "python3"), f"entrypoint must run python: {argv}"
    script, rest = argv[1], argv[2:]
    flags = _script_flags(script)
    config, overrides = None, []
    i = 0
    while i < len(rest):
        if rest[i] == "--config" and i + 1 < len(rest):
            config, i = rest[i + 1], i + 2
        elif rest[i] in flags and i + 1 < len(rest):
            i += 2  # an option of this script (e.g. evaluate.py --model PATH)
        elif re.match(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*=", rest[i]):
            overrides.append(rest[i])
            i += 1
        else:
            raise AssertionError(f"unexpected entrypoint argument {rest[i]!r} (not --config, an option "
                                 f"{script} declares, or key=value)")
    assert config is not None, "entrypoint has no --config FILE"
    return script, config, overrides


@pytest.mark.parametrize("key,job", RAYJOBS, ids=_ids(RAYJOBS))
def test_entrypoint_names_an_existing_script_and_config(key, job):
    script, config, overrides = _entrypoint(job)
    assert re.fullmatch(r"pipelines/\w+\.py", script), f"{key}: {script} is not pipelines/<name>.py"
    assert (REPO_ROOT / script).is_file(), f"{key}: {script} does not exist in the repository"
    assert not Path(config).is_absolute() and (REPO_ROOT / config).is_file(), (
        f"{key}: config {config} does not exist in the repository")
    # Runs must land on the shared volume, under a fixed name, so that a resubmission resumes.
    assert f"run.root={RUN_ROOT}" in overrides, f"{key}: needs run.root={RUN_ROOT}"
    assert any(o.startswith("run.name=") and len(o) > len("run.name=") for o in overrides), (
        f"{key}: needs run.name=<name>")


def test_every_stage_job_runs_its_stage():
    by_file = {k.split("#")[0]: d for k, d in RAYJOBS}
    for stage in STAGES:
        script, _, _ = _entrypoint(by_file[f"rayjob-{stage}.yaml"])
        assert script == f"pipelines/{stage.replace('-', '_')}.py", (stage, script)


@pytest.mark.parametrize("key,job", RAYJOBS, ids=_ids(RAYJOBS))
def test_entrypoint_overrides_load_with_the_project_config(key, job):
    """--config plus the overrides pass aurora's own config loader (keys and types exist)."""
    from aurora_core.config import load_config

    _, config, overrides = _entrypoint(job)
    if not (REPO_ROOT / config).is_file():
        pytest.fail(f"{key}: config {config} does not exist in the repository")
    load_config(REPO_ROOT / config, overrides)


@pytest.mark.parametrize("key,job", RAYJOBS, ids=_ids(RAYJOBS))
def test_runtime_env_yaml_parses(key, job):
    env = _runtime_env(job)
    assert isinstance(env, dict), f"{key}: runtimeEnvYAML is not a mapping"
    env_vars = env.get("env_vars", {})
    assert isinstance(env_vars, dict)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items()), (
        f"{key}: Ray needs env_vars values as strings: {env_vars}")
    if "working_dir" in env:
        # A local path would be read inside the submitter pod (K8sJobMode) or rejected (HTTPMode).
        assert "://" in env["working_dir"], f"{key}: working_dir must be a URI, not a local path"


@pytest.mark.parametrize("key,job", RAYJOBS, ids=_ids(RAYJOBS))
def test_rayjob_cluster_and_lifecycle(key, job):
    spec = job["spec"]
    assert spec.get("submissionMode", "K8sJobMode") in SUBMISSION_MODES, key
    assert ("clusterSelector" in spec) != ("rayClusterSpec" in spec), (
        f"{key}: exactly one of clusterSelector and rayClusterSpec")
    if spec.get("ttlSecondsAfterFinished", 0) > 0:
        assert spec.get("shutdownAfterJobFinishes") is True, (
            f"{key}: KubeRay rejects ttlSecondsAfterFinished without shutdownAfterJobFinishes")
    if "clusterSelector" in spec:
        names = {d["metadata"]["name"] for _, d in RAYCLUSTERS}
        assert spec["clusterSelector"].get("ray.io/cluster") in names, (
            f"{key}: clusterSelector must name a RayCluster of cluster/kuberay/ ({names})")
        # With clusterSelector the cluster is shared: a RayJob retry deletes the cluster it ran on,
        # and shutdownAfterJobFinishes has nothing of its own to shut down.
        assert spec.get("backoffLimit", 0) == 0, f"{key}: no backoffLimit with clusterSelector"
        assert not spec.get("shutdownAfterJobFinishes"), f"{key}: shutdownAfterJobFinishes with clusterSelector"
    else:
        assert spec.get("shutdownAfterJobFinishes") is True, (
            f"{key}: a RayJob with its own cluster should release it when done")


def test_one_store_for_mlflow():
    """Pods and job runtime envs agree on MLFLOW_TRACKING_URI, and it points at the shared volume."""
    uris = set()
    for _, spec in CLUSTER_SPECS:
        for _, pod in _pod_specs(spec):
            for env in _ray_container(pod).get("env", []):
                if env["name"] == "MLFLOW_TRACKING_URI":
                    uris.add(env["value"])
    for _, job in RAYJOBS:
        uri = _runtime_env(job).get("env_vars", {}).get("MLFLOW_TRACKING_URI")
        if uri is not None:
            uris.add(uri)
    assert len(uris) == 1, uris
    uri = uris.pop()
    assert uri.startswith(f"sqlite:///{SHARED_MOUNT}/") or uri.startswith(("http://", "https://")), uri


# --------------------------------------------------------------------------------------------------
# Cluster specs (raycluster.yaml and inline rayClusterSpec)


def _ray_pin() -> str:
    text = (REPO_ROOT / "pyproject.toml").read_text()
    m = re.search(r'"ray(\[[^\]]*\])?==([^"]+)"', text)
    assert m, "no ray==X pin in pyproject.toml"
    return m.group(2)


@pytest.mark.parametrize("key,spec", CLUSTER_SPECS, ids=_ids(CLUSTER_SPECS))
def test_ray_version_matches_the_pin(key, spec):
    assert spec.get("rayVersion") == _ray_pin(), f"{key}: rayVersion must equal the ray pin in pyproject.toml"


@pytest.mark.parametrize("key,spec", CLUSTER_SPECS, ids=_ids(CLUSTER_SPECS))
def test_head_takes_no_work(key, spec):
    head = spec["headGroupSpec"]
    assert head.get("rayStartParams", {}).get("num-cpus") == "0", f"{key}: head needs num-cpus: \"0\""
    assert GPU not in _limits(_ray_container(head["template"]["spec"])), f"{key}: head asks for GPUs"


@pytest.mark.parametrize("key,spec", CLUSTER_SPECS, ids=_ids(CLUSTER_SPECS))
def test_gpu_worker_groups(key, spec):
    groups = spec.get("workerGroupSpecs", [])
    gpu_groups = [g for g in groups if int(_limits(_ray_container(g["template"]["spec"])).get(GPU, 0)) > 0]
    assert gpu_groups, f"{key}: no worker group requests {GPU}"
    for g in groups:
        if "gpu" in g["groupName"]:
            assert g in gpu_groups, f"{key}: group {g['groupName']} is named gpu but requests no {GPU}"
    for g in gpu_groups:
        pod = g["template"]["spec"]
        limits = _ray_container(pod)["resources"].get("limits", {})
        assert GPU in limits, f"{key}/{g['groupName']}: {GPU} belongs in limits"
        assert any(t.get("key") == GPU and t.get("effect") in ("NoSchedule", None)
                   for t in pod.get("tolerations", [])), f"{key}/{g['groupName']}: no toleration for {GPU}"
        assert pod.get("nodeSelector") or pod.get("affinity"), f"{key}/{g['groupName']}: no node selection"
        assert g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]


@pytest.mark.parametrize("key,spec", CLUSTER_SPECS, ids=_ids(CLUSTER_SPECS))
def test_workers_stop_ray_before_going(key, spec):
    def has_prestop(pod):
        cmd = _ray_container(pod).get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        return "ray stop" in " ".join(cmd)

    pods = dict(_pod_specs(spec))
    workers = [p for name, p in pods.items() if name != "head"]
    assert has_prestop(pods["head"]) or (workers and all(has_prestop(p) for p in workers)), (
        f"{key}: needs a preStop `ray stop` on the head or on every worker group")


@pytest.mark.parametrize("key,spec", CLUSTER_SPECS, ids=_ids(CLUSTER_SPECS))
def test_every_pod_mounts_the_shared_volume_and_shm(key, spec):
    pvc = yaml.safe_load(PVC_FILE.read_text())
    assert pvc["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in pvc["spec"]["accessModes"]
    for group, pod in _pod_specs(spec):
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounts = {m["mountPath"]: m["name"] for m in _ray_container(pod).get("volumeMounts", [])}
        assert SHARED_MOUNT in mounts, f"{key}/{group}: {SHARED_MOUNT} not mounted"
        claim = volumes[mounts[SHARED_MOUNT]].get("persistentVolumeClaim", {}).get("claimName")
        assert claim == pvc["metadata"]["name"], f"{key}/{group}: {SHARED_MOUNT} is not the PVC of cluster/pvc.yaml"
        assert "/dev/shm" in mounts, f"{key}/{group}: no /dev/shm volume (Ray object store, NCCL)"
        assert volumes[mounts["/dev/shm"]].get("emptyDir", {}).get("medium") == "Memory", f"{key}/{group}"


def test_one_image_everywhere():
    images = set()
    for _, spec in CLUSTER_SPECS:
        for _, pod in _pod_specs(spec):
            for c in pod.get("containers", []) + pod.get("initContainers", []):
                images.add(c["image"])
    for _, job in RAYJOBS:
        tmpl = job["spec"].get("submitterPodTemplate")
        if tmpl:
            images.update(c["image"] for c in tmpl["spec"]["containers"] if "image" in c)
    assert len(images) == 1, f"manifests use different images: {sorted(images)}"
    image = images.pop()
    assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"pin a tag: {image}"


# --------------------------------------------------------------------------------------------------
# The rest of cluster/


def test_local_runtime_env():
    env = yaml.safe_load((REPO_ROOT / "cluster" / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "."
    assert {".venv/", "runs/"} <= set(env.get("excludes", [])), "the upload must leave out .venv and runs"
    assert all(isinstance(v, str) for v in env.get("env_vars", {}).values())


@pytest.mark.parametrize("script", ["start_local.sh", "stop_local.sh"])
def test_local_scripts_parse(script):
    import subprocess

    path = REPO_ROOT / "cluster" / script
    assert os.access(path, os.X_OK), f"{script} is not executable"
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
