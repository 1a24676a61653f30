"""The deployment kit: every manifest parses, and the fields that link them agree.

Docker and a Kubernetes cluster are not needed: these tests read the files as an operator's
tools would (YAML documents, the kustomization's generators, the Dockerfile's stages).
"""

from __future__ import annotations

import fnmatch
import importlib.util
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipelines.spec.load import validate_document
from tests.conftest import REPO

INFRA = REPO / "infra"
K8S = INFRA / "k8s"
SECRET_NAME = re.compile(r"KEY|SECRET|PASSWORD|TOKEN|CREDENTIAL", re.IGNORECASE)
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def manifests() -> dict[str, list[dict[str, Any]]]:
    return {path.name: documents(path) for path in sorted(K8S.glob("*.yaml"))}


def one(kind: str, name: str | None = None, file: str | None = None) -> dict[str, Any]:
    found = [
        doc
        for filename, docs in manifests().items()
        for doc in docs
        if doc.get("kind") == kind and (file is None or filename == file)
        if name is None or doc["metadata"].get("name") == name
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''} in {file or 'infra/k8s'}"
    return found[0]


def ray_pod_specs(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """group name ('head', 'cpu', 'gpu') -> pod spec of a RayCluster spec."""
    pods = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    for group in cluster["workerGroupSpecs"]:
        pods[group["groupName"]] = group["template"]["spec"]
    return pods


def job_specs() -> dict[str, dict[str, Any]]:
    """Every RayJob spec: the two RayJob templates and the RayCronJob's jobTemplate."""
    return {
        "rayjob.yaml": one("RayJob", file="rayjob.yaml")["spec"],
        "rayjob-s3.yaml": one("RayJob", file="rayjob-s3.yaml")["spec"],
        "raycronjob.yaml": one("RayCronJob")["spec"]["jobTemplate"],
    }


def containers(node: Any) -> list[dict[str, Any]]:
    """Every container (and init container) anywhere in a manifest."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                found += value
            found += containers(value)
    elif isinstance(node, list):
        for item in node:
            found += containers(item)
    return found


def quantity(text: str | int | float) -> float:
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text))
    assert match, f"not a quantity: {text!r}"
    return float(match.group(1)) * units.get(match.group(2), 1)


def kustomization() -> dict[str, Any]:
    return documents(K8S / "kustomization.yaml")[0]


def generated_configmap(name: str) -> dict[str, Path]:
    """key -> source file of a ConfigMap the kustomization generates."""
    for generator in kustomization()["configMapGenerator"]:
        if generator["name"] == name:
            pairs = [f.split("=", 1) if "=" in f else [Path(f).name, f] for f in generator["files"]]
            return {key: K8S / file for key, file in pairs}
    raise AssertionError(f"the kustomization generates no ConfigMap {name!r}")


# ----------------------------------------------------------------------------- parsing
def test_every_manifest_parses_and_the_kustomization_names_existing_files() -> None:
    files = sorted(K8S.glob("*.yaml")) + [INFRA / "compose.yaml"]
    for path in files:
        for doc in documents(path):
            assert isinstance(doc, dict), path
    resources = kustomization()["resources"]
    assert {"raycluster.yaml", "cronjob.yaml"} <= set(resources)
    for name in resources:
        assert (K8S / name).is_file(), name
    for generator in kustomization()["configMapGenerator"]:
        for path in generated_configmap(generator["name"]).values():
            assert path.is_file(), path
    assert kustomization()["generatorOptions"]["disableNameSuffixHash"] is True


# ----------------------------------------------------------------------------- images
def test_ray_images_are_the_mergeline_image_of_this_version() -> None:
    cluster = one("RayCluster")["spec"]
    images = {group: pod["containers"][0]["image"] for group, pod in ray_pod_specs(cluster).items()}
    for job in job_specs().values():
        images["submitter"] = job["submitterPodTemplate"]["spec"]["containers"][0]["image"]
        assert images["submitter"] == images["head"]
    repositories = {image.rsplit(":", 1)[0] for image in images.values()}
    assert len(repositories) == 1 and repositories.pop().endswith("/mergeline")
    for group, image in images.items():
        variant = "cuda" if group == "gpu" else "cpu"
        assert image.rsplit(":", 1)[1] == f"{VERSION}-{variant}", group
    compose = documents(INFRA / "compose.yaml")[0]["services"]["ray-head"]
    assert compose["image"] == f"mergeline:{VERSION}-cpu"
    assert compose["build"]["dockerfile"] == "infra/Dockerfile"
    assert compose["build"]["args"]["VARIANT"] == "cpu"


def test_every_image_is_pinned() -> None:
    images = [c["image"] for docs in manifests().values() for d in docs for c in containers(d)]
    images += [s["image"] for s in documents(INFRA / "compose.yaml")[0]["services"].values()]
    for image in images:
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest" and "/" not in tag, image


def test_the_ray_version_matches_the_image_and_the_requirement() -> None:
    dockerfile = (INFRA / "Dockerfile").read_text()
    ray_version = re.search(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.M).group(1)
    assert one("RayCluster")["spec"]["rayVersion"] == ray_version
    requirement = next(
        d
        for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
        if d.startswith("ray")
    )
    minimum = re.search(r">=([0-9.]+)", requirement).group(1)
    as_tuple = lambda text: tuple(int(p) for p in text.split("."))  # noqa: E731
    assert as_tuple(ray_version) >= as_tuple(minimum)


def test_the_dockerfile_builds_cpu_and_cuda_with_torch_first() -> None:
    text = (INFRA / "Dockerfile").read_text()
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M)
    assert re.search(r"^ARG TORCH_VERSION=2\.13\.0$", text, re.M)
    stages = dict(re.findall(r"^FROM (\S+) AS (base-\w+)$", text, re.M)[i][::-1] for i in (0, 1))
    assert stages["base-cpu"].endswith("-cpu") and "-cu" in stages["base-cuda"]
    assert re.search(r"^FROM base-\$\{VARIANT\}$", text, re.M)
    assert "download.pytorch.org/whl/cpu" in text
    torch_at = text.index('"torch==${TORCH_VERSION}"')
    assert torch_at < text.index("pip install --no-cache-dir .")
    for package in ("pipelines", "workers", "storage"):
        assert f"COPY --chown=ray:users {package} ./{package}" in text
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
    rules = [line.strip() for line in ignore if line.strip() and not line.startswith("#")]
    assert rules[0] == "*"  # an allow-list: nothing else (.venv, .mergeline) is sent
    for needed in ("pyproject.toml", "README.md", "pipelines/", "workers/", "storage/"):
        assert f"!{needed}" in rules
    assert "examples/nightly-data/" in rules


# ----------------------------------------------------------------------------- command, spec
def test_the_rayjobs_run_mergeline_on_the_mounted_spec() -> None:
    cluster = one("RayCluster")
    head = ray_pod_specs(cluster["spec"])["head"]
    mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in head["volumes"]}
    for name, job in job_specs().items():
        assert job["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}, name
        commands = [shlex.split(part) for part in job["entrypoint"].split("&&")]
        run = commands[-1]
        assert run[:2] == ["mergeline", "run"], name
        spec_path = Path(run[2])
        if name == "rayjob-s3.yaml":  # fetched from S3 by mergeline's own reader first
            assert commands[0][:3] == ["python", "-m", "storage.files"]
            assert importlib.util.find_spec(commands[0][2]) is not None  # shipped in the image
            assert commands[0][3].startswith("s3://") and commands[0][4] == str(spec_path)
            continue
        volume = volumes[mounts[str(spec_path.parent)]]
        source = generated_configmap(volume["configMap"]["name"])[spec_path.name]
        spec = validate_document(yaml.safe_load(source.read_text()), str(source))
        assert spec.compute.ray_address == "auto"
        assert spec.storage.uri.startswith("s3://") and spec.tracking.uri.startswith("http")


def test_the_schedules_create_the_rayjob() -> None:
    cron = one("CronJob")
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    command = pod["containers"][0]["command"]
    assert command[:3] == ["kubectl", "create", "-f"]
    template = Path(command[3])
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    volume = next(v for v in pod["volumes"] if v["name"] == mounts[str(template.parent)])
    source = generated_configmap(volume["configMap"]["name"])[template.name]
    assert source == K8S / "rayjob.yaml"
    rayjob = documents(source)[0]
    assert rayjob["kind"] == "RayJob" and rayjob["metadata"]["generateName"]
    assert one("RayCronJob")["spec"]["jobTemplate"] == rayjob["spec"]
    assert one("RayCronJob")["spec"]["schedule"] == cron["spec"]["schedule"]

    account = pod["serviceAccountName"]
    assert one("ServiceAccount", account)
    binding = one("RoleBinding")
    assert {"kind": "ServiceAccount", "name": account} in binding["subjects"]
    role = one("Role", binding["roleRef"]["name"])
    assert any(
        "ray.io" in rule["apiGroups"]
        and "rayjobs" in rule["resources"]
        and "create" in rule["verbs"]
        for rule in role["rules"]
    )


# ----------------------------------------------------------------------------- secrets
def test_kubernetes_secrets_are_referenced_never_written() -> None:
    for filename, docs in manifests().items():
        for doc in docs:
            assert doc.get("kind") != "Secret", f"{filename} writes a Secret: create it by hand"
            for container in containers(doc):
                for entry in container.get("env", []):
                    if SECRET_NAME.search(entry["name"]):
                        assert "value" not in entry, f"{filename}: {entry['name']} is literal"
                        assert "secretKeyRef" in entry["valueFrom"], entry["name"]
    for group, pod in ray_pod_specs(one("RayCluster")["spec"]).items():
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[key]["valueFrom"]["secretKeyRef"]["name"] == "mergeline-storage", group


def test_compose_takes_every_secret_from_the_ignored_env_file() -> None:
    services = documents(INFRA / "compose.yaml")[0]["services"]
    text = yaml.safe_dump(services)  # the values, not the comments
    for name, service in services.items():
        assert "env_file" not in service, f"{name}: pass only the variables it needs"
        for key, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{\w+(:\?[^}]*)?\}", str(value)), f"{name}: {key}"
    example = (INFRA / ".env.example").read_text()
    defined = set(re.findall(r"^(\w+)=", example, re.M))
    referenced = set(re.findall(r"(?<!\$)\$\{(\w+)", text))
    assert referenced and referenced <= defined
    patterns = [p.strip() for p in (REPO / ".gitignore").read_text().splitlines() if p.strip()]
    assert any(fnmatch.fnmatch("infra/.env", p) or p == ".env" for p in patterns)
    assert not any(fnmatch.fnmatch("infra/.env.example", p) for p in patterns)


def test_compose_has_minio_postgres_mlflow_and_a_ray_head() -> None:
    services = documents(INFRA / "compose.yaml")[0]["services"]
    mlflow = services["mlflow"]["environment"]
    assert mlflow["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert "@postgres:5432/" in mlflow["MLFLOW_BACKEND_STORE_URI"]
    assert mlflow["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert mlflow["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    head = services["ray-head"]
    assert head["command"][:3] == ["ray", "start", "--head"]
    assert head["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert head["environment"]["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert head["deploy"]["resources"]["limits"]["memory"] and head["shm_size"]


# ----------------------------------------------------------------------------- resources
@pytest.mark.parametrize("filename", sorted(p.name for p in K8S.glob("*.yaml")))
def test_every_container_requests_cpu_and_memory_within_its_limits(filename: str) -> None:
    for doc in documents(K8S / filename):
        for container in containers(doc):
            resources = container.get("resources", {})
            requests, limits = resources.get("requests", {}), resources.get("limits", {})
            for resource in ("cpu", "memory"):
                assert resource in requests and resource in limits, (filename, container["name"])
                assert quantity(requests[resource]) <= quantity(limits[resource])


def test_the_gpu_group_asks_for_gpus_and_the_head_runs_no_tasks() -> None:
    cluster = one("RayCluster")["spec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    pods = ray_pod_specs(cluster)
    for group in ("cpu", "gpu"):
        resources = pods[group]["containers"][0]["resources"]
        gpus = quantity(resources["limits"].get("nvidia.com/gpu", 0))
        assert (gpus >= 1) == (group == "gpu")
    assert cluster["enableInTreeAutoscaling"] is True
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
