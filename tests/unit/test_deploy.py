"""Consistency of the container and Kubernetes files with the code they run."""

from __future__ import annotations

import re
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from service.config import Settings

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
SETTING_VARS = {f"SUPPORTLENS_{f.name.upper()}" for f in fields(Settings)}
OTHER_VARS = {"PROMETHEUS_MULTIPROC_DIR", "JOB_NAME"}


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _all_documents() -> dict[str, dict]:
    return {
        f"{path.relative_to(K8S)}#{i}": doc
        for path in sorted(K8S.rglob("*.yaml"))
        for i, doc in enumerate(_documents(path))
    }


def _containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("containers", [])


def test_deploy_manifests_parse_and_have_kind():
    docs = _all_documents()
    assert docs
    for name, doc in docs.items():
        assert "kind" in doc and "apiVersion" in doc, name


def test_deploy_kustomization_lists_existing_files():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource


def test_deploy_env_vars_are_settings_the_service_reads():
    config_map = _documents(K8S / "configmap.yaml")[0]
    names = set(config_map["data"])
    for doc in _all_documents().values():
        for container in _containers(doc):
            names |= {env["name"] for env in container.get("env", [])}
    names |= set(
        re.findall(r"(SUPPORTLENS_[A-Z_]+)=", (REPO / "deploy" / "Dockerfile").read_text())
    )
    unknown = names - SETTING_VARS - OTHER_VARS
    assert not unknown, f"variables no code reads: {sorted(unknown)}"


def test_deploy_api_key_comes_from_the_secret():
    deployment = _documents(K8S / "deployment.yaml")[0]
    (container,) = _containers(deployment)
    env = {e["name"]: e for e in container["env"]}
    secret_ref = env["SUPPORTLENS_API_KEY"]["valueFrom"]["secretKeyRef"]
    secret = _documents(K8S / "secret.example.yaml")[0]
    assert secret_ref["name"] == secret["metadata"]["name"]
    assert secret_ref["key"] in secret["stringData"]


def test_deploy_probes_hit_open_routes_of_the_server():
    from service.app import ROUTES
    from service.middleware import INFERENCE_PREFIX

    deployment = _documents(K8S / "deployment.yaml")[0]
    (container,) = _containers(deployment)
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        path = container[probe]["httpGet"]["path"]
        # Probes carry no API key, so they must hit a route outside the authenticated prefix.
        assert path in ROUTES and not path.startswith(INFERENCE_PREFIX), probe


def test_deploy_training_jobs_run_declared_scripts_and_existing_recipes():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for job in sorted((K8S / "jobs").glob("*.yaml")):
        (doc,) = _documents(job)
        assert doc["kind"] == "Job"
        (container,) = _containers(doc)
        command = " ".join(container["args"])
        script, recipe = re.search(r"exec (\S+) (\S+\.yaml)", command).groups()
        assert script in scripts, f"{job.name}: {script} is not a console script"
        assert (REPO / recipe).is_file(), f"{job.name}: {recipe} does not exist"
        assert container["resources"]["limits"].get("nvidia.com/gpu") == 1
