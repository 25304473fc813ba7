"""The checks operators run on deploy/, offline: schemas, Dockerfile lint, policy scan.

``make deploy-deps`` (part of ``make test``) installs the tools: ``kubectl`` (Debian
package, bundles kustomize), ``kubernetes-validate`` and ``hadolint`` (the ``deploy``
extra) in .venv, and ``checkov`` in its own virtualenv (``.venv-checks``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_deploy import DOCKERFILES, K8S, KUSTOMIZATIONS, REPO, kubectl

pytestmark = pytest.mark.unit

BIN = Path(sys.executable).parent
CHECKOV = REPO / ".venv-checks" / "bin" / "checkov"


def tool(path: Path | str) -> str:
    found = shutil.which(str(path)) if not Path(path).is_file() else str(path)
    if not found:
        pytest.fail(f"{path} is not installed: `make deploy-deps` installs it")
    return found


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_deploy_rendered_objects_pass_strict_schema_validation(directory, tmp_path):
    rendered = subprocess.run(
        [kubectl(), "kustomize", str(K8S / directory)], capture_output=True, text=True, check=True
    ).stdout
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(rendered)
    result = subprocess.run(
        [tool(BIN / "kubernetes-validate"), "--strict", "--quiet", str(manifest)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    kinds = {line.split()[0] for line in rendered.splitlines() if line.startswith("kind:")}
    assert kinds  # something was validated, Jobs and CronJobs included


def test_deploy_strict_validation_rejects_an_unknown_field(tmp_path):
    """The validator really is strict: a misspelt field fails."""
    manifest = tmp_path / "job.yaml"
    manifest.write_text(
        "apiVersion: batch/v1\nkind: Job\nmetadata: {name: x}\nspec:\n"
        "  completionsMode: Indexed\n  template:\n    spec:\n      restartPolicy: Never\n"
        "      containers: [{name: x, image: x}]\n"
    )
    result = subprocess.run(
        [tool(BIN / "kubernetes-validate"), "--strict", "--quiet", str(manifest)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0 and "completionsMode" in result.stdout + result.stderr


def test_deploy_dockerfiles_pass_hadolint():
    assert DOCKERFILES
    result = subprocess.run(
        [tool(BIN / "hadolint"), *map(str, DOCKERFILES)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # Every ignore says why, on the comment lines right above it.
    for dockerfile in DOCKERFILES:
        lines = dockerfile.read_text().splitlines()
        for number, line in enumerate(lines):
            if "hadolint ignore=" in line:
                above = lines[number - 1]
                assert above.startswith("# ") and "hadolint ignore=" not in above, (
                    f"{dockerfile.name}:{number + 1}: an ignore without its reason"
                )


def test_deploy_checkov_finds_no_unexplained_failure():
    """checkov renders every kustomization and scans it with the Dockerfiles; a skipped
    check must carry its reason inline (checkov.io/skipN annotations, checkov:skip comments)."""
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"}
    env["PATH"] = f"{Path(kubectl()).parent}:{env.get('PATH', '')}"
    result = subprocess.run(
        [
            tool(CHECKOV),
            "--directory",
            str(REPO / "deploy"),
            "--framework",
            "kustomize",
            "dockerfile",
            "secrets",
            "--skip-download",
            "--output",
            "json",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        timeout=600,
    )
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    by_type = {r["check_type"]: r for r in reports if "check_type" in r}
    assert {"kustomize", "dockerfile"} <= set(by_type), result.stderr[-2000:]
    failed = [
        f"{c['check_id']} {c['resource']} ({c['file_path']})"
        for r in reports
        for c in r.get("results", {}).get("failed_checks", [])
    ]
    assert not failed, "\n".join(failed)
    assert by_type["kustomize"]["summary"]["passed"] > 500
    for report in reports:
        for check in report.get("results", {}).get("skipped_checks", []):
            reason = (check.get("check_result") or {}).get("suppress_comment", "")
            assert len(reason.strip()) > 15, f"{check['check_id']} skipped without a reason"
