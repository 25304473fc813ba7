"""The retraining pipeline's pieces: the atomic pointer, the decision, the restart call."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import ClassVar

import pytest

from training import promote

pytestmark = pytest.mark.unit


def make_versions(models_dir: Path, *names: str) -> None:
    for name in names:
        (models_dir / "versions" / name / "bundle").mkdir(parents=True)
        (models_dir / "versions" / name / "bundle" / "marker").write_text(name)


def test_promote_pointer_switch_is_atomic_for_readers(tmp_path):
    """A reader resolving current/bundle during 600 switches always finds a bundle."""
    make_versions(tmp_path, "a", "b")
    promote.point(tmp_path, "current", "a")
    stop = threading.Event()
    seen: list[str] = []
    errors: list[Exception] = []

    def read() -> None:
        while not stop.is_set():
            try:
                seen.append((tmp_path / "current" / "bundle" / "marker").read_text())
            except OSError as exc:
                errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(600):
        promote.point(tmp_path, "current", "ab"[i % 2])
    stop.set()
    reader.join()
    assert not errors, errors[:3]
    assert {"a", "b"} <= set(seen)
    assert os.readlink(tmp_path / "current") == "versions/b"
    assert not list(tmp_path.glob(".current.tmp-*"))


def test_promote_switch_keeps_the_previous_version_and_history(tmp_path):
    make_versions(tmp_path, "a", "b")
    promote.switch(tmp_path, "a", "promote")
    assert promote.pointed_version(tmp_path, "previous") is None
    promote.switch(tmp_path, "b", "promote")
    assert promote.status(tmp_path) == {"current": "b", "previous": "a", "versions": ["a", "b"]}
    history = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [(h["from"], h["to"]) for h in history] == [(None, "a"), ("a", "b")]


def test_promote_refuses_a_pointer_that_is_a_directory(tmp_path):
    make_versions(tmp_path, "a")
    (tmp_path / "current").mkdir()
    with pytest.raises(promote.PipelineError, match="must be a symlink"):
        promote.point(tmp_path, "current", "a")


@pytest.mark.parametrize(
    ("candidate", "serving", "margin", "promoted"),
    [
        (0.80, 0.80, 0.0, True),
        (0.79, 0.80, 0.0, False),
        (0.81, 0.80, 0.02, False),
        (0.79, 0.80, -0.02, True),
    ],
)
def test_promote_decides_on_metric_and_margin(candidate, serving, margin, promoted):
    decision = promote.decide(
        "new", {"macro_f1": candidate}, "old", {"macro_f1": serving}, "macro_f1", margin
    )
    assert decision.promoted is promoted
    assert decision.reason.startswith(f"macro_f1 {candidate:.4f}")


def test_promote_first_candidate_is_promoted_when_nothing_serves():
    decision = promote.decide("new", {"accuracy": 0.1}, None, None, "accuracy", 0.5)
    assert decision.promoted and decision.reason == "nothing is serving yet"


class _Recorder(http.server.BaseHTTPRequestHandler):
    requests: ClassVar[list] = []

    def do_PATCH(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Recorder.requests.append((self.path, dict(self.headers), json.loads(body)))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


def test_promote_restart_patches_the_restarted_at_annotation_like_kubectl():
    server = http.server.HTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        stamp = promote.restart_deployment(
            "supportlens",
            namespace="supportlens",
            api_url=f"http://127.0.0.1:{server.server_port}",
            token="sa-token",
        )
    finally:
        server.shutdown()
    ((path, headers, body),) = _Recorder.requests
    assert path == "/apis/apps/v1/namespaces/supportlens/deployments/supportlens"
    assert headers["Authorization"] == "Bearer sa-token"
    assert headers["Content-Type"] == "application/strategic-merge-patch+json"
    annotations = body["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"kubectl.kubernetes.io/restartedAt": stamp}


def test_promote_restart_refused_by_the_api_server_is_an_error():
    class Forbidden(_Recorder):
        def do_PATCH(self):
            self.send_response(403)
            self.end_headers()

    server = http.server.HTTPServer(("127.0.0.1", 0), Forbidden)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(promote.PipelineError, match="HTTP 403"):
            promote.restart_deployment(
                "other",
                namespace="supportlens",
                api_url=f"http://127.0.0.1:{server.server_port}",
                token="t",
            )
    finally:
        server.shutdown()


def test_promote_restart_is_skipped_outside_kubernetes(monkeypatch, caplog):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    called = []
    monkeypatch.setattr(promote, "restart_deployment", lambda *a, **k: called.append(a))
    with caplog.at_level("INFO", logger="training.promote"):
        promote.maybe_restart("supportlens")
    assert not called
    assert "not running in Kubernetes: skipping the restart" in caplog.text


def test_promote_training_resumes_the_same_version_and_uses_the_launcher(tmp_path, monkeypatch):
    commands = []

    def fake_run(command, check):
        commands.append(command)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(promote.subprocess, "run", fake_run)
    output = tmp_path / "versions" / "v1"
    promote.train_candidate(tmp_path, "v1", ["recipe.yaml", "--seed", "1"], None)
    (output / "checkpoint-10").mkdir(parents=True)
    promote.train_candidate(tmp_path, "v1", ["recipe.yaml"], "torchrun --nproc_per_node=4")
    (output / "bundle").mkdir()
    promote.train_candidate(tmp_path, "v1", ["recipe.yaml"], None)  # trained: no command
    first, second = commands
    assert first == [
        sys.executable, "-m", "training.train_intent", "recipe.yaml", "--seed", "1",
        "--output_dir", str(output),
    ]  # fmt: skip
    assert second[:4] == ["torchrun", "--nproc_per_node=4", "-m", "training.train_intent"]
    assert second[-2:] == ["--resume", "true"]


def test_promote_default_version_is_stable_within_a_job(monkeypatch):
    monkeypatch.setenv("JOB_NAME", "retrain-intent")
    monkeypatch.setenv("JOB_UID", "0f1e2d3c-aaaa-bbbb")
    assert promote.default_version() == "retrain-intent-0f1e2d3c"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--models_dir", "m", "--heldout_file", "h.csv"], "training arguments after `--`"),
        (["rollback", "--models_dir", "m", "--", "x"], "takes no training arguments"),
        (["promote", "--models_dir", "m", "--heldout_file", "h.csv", "--candidate", "../x"], "plain directory name"),
        (["promote", "--models_dir", "m", "--heldout_file", "h.csv", "--candidate", "v", "--metric", "loss"], "invalid choice"),
        (["promote", "--models_dir", "m", "--heldout_file", "missing.csv", "--candidate", "v"], "no such file"),
        (["rollback", "--models_dir", "m"], "no previous version"),
    ],
)  # fmt: skip
def test_promote_bad_arguments_exit_2_with_one_line(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "h.csv").write_text("text,label\nhi,a\n")
    with pytest.raises(SystemExit) as raised:
        sys.exit(promote.main(argv))
    assert raised.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
