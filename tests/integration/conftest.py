"""Fixtures for the service tests: tiny random bundles and real servers in subprocesses.

Each server runs ``python -m service.server`` in its own session on a free loopback
port, configured only through ``SUPPORTLENS_*`` variables, like a deployment.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch

REPO = Path(__file__).resolve().parents[2]
INTENTS = ["card_lost", "refund", "transfer_failed", "top_up"]


def build_tiny_bundles(directory: Path, backbone: Path) -> tuple[Path, Path]:
    """A tiny random intent classifier and summarizer, saved as bundles in ``directory``."""
    from models.backbone import load_backbone
    from models.bundle import save_bundle
    from models.classifier import ClassifierConfig, IntentClassifier
    from models.summarizer import ExtractiveSummarizer, SummarizerConfig
    from training.out_of_scope import fit_detector

    encoder, tokenizer = load_backbone(str(backbone))
    torch.manual_seed(0)
    classifier = IntentClassifier(
        ClassifierConfig(
            num_labels=len(INTENTS),
            special_token_ids=tokenizer.all_special_ids,
        ),
        encoder,
    ).eval()
    # A k-NN out-of-scope detector over a few messages' pooled features, so the service
    # runs the same path as for a trained bundle (its threshold is left at "never flags").
    examples = ["I lost my card", "where is my refund", "my transfer failed", "top up please"]
    encoded = tokenizer(examples, padding=True, return_tensors="pt")
    with torch.no_grad():
        pooled = classifier(**encoded, output_pooled=True).pooled
    detector = fit_detector("knn", pooled.numpy(), range(len(examples)), len(INTENTS), k=2)
    intent = save_bundle(
        directory / "intent",
        classifier,
        tokenizer,
        task="intent-classification",
        labels=INTENTS,
        calibration={"temperature": 1.0, "oos_threshold": 0.0},
        training={"max_length": 64, "name": "tiny-intent"},
        detector=detector,
    )
    encoder, tokenizer = load_backbone(str(backbone))
    summarizer = ExtractiveSummarizer(
        SummarizerConfig(
            context_layers=1,
            context_heads=2,
            context_feedforward=64,
        ),
        encoder,
    ).eval()
    summary = save_bundle(
        directory / "summarizer",
        summarizer,
        tokenizer,
        task="extractive-summarization",
        training={"max_length": 64, "name": "tiny-summarizer"},
    )
    return intent, summary


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A ``service.server`` subprocess; ``url`` is its base address."""

    def __init__(self, env: dict[str, str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self.env = full_env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "SUPPORTLENS_HOST": "127.0.0.1",
            "SUPPORTLENS_PORT": str(self.port),
            "SUPPORTLENS_TORCH_THREADS": "1",
            "SUPPORTLENS_DEVICE": "cpu",
            "SUPPORTLENS_WORKERS": "1",
            "SUPPORTLENS_LOG_LEVEL": "warning",
            **env,
        }
        full_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):  # the server's own choice
            if name not in env:
                full_env.pop(name, None)
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service.server"],
            cwd=REPO,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: nothing leaks into pytest's
        )

    def wait_ready(self, timeout: float = 120) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=timeout)
        # Whatever is left of its process group (nothing, when shutdown works).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self._log.close()
        return self.process.returncode


@pytest.fixture(scope="session")
def tiny_bundles(tiny_backbone, tmp_path_factory) -> tuple[Path, Path]:
    return build_tiny_bundles(tmp_path_factory.mktemp("bundles"), tiny_backbone)


def bundle_env(bundles: tuple[Path, Path]) -> dict[str, str]:
    intent, summarizer = bundles
    return {
        "SUPPORTLENS_INTENT_BUNDLE": str(intent),
        "SUPPORTLENS_SUMMARIZER_BUNDLE": str(summarizer),
    }


API_KEY = "test-key-0123456789"
# The main test server: an API key, small limits (so 413/429/504 are quick to
# provoke), two HTTP processes (so metrics and limits must be shared) and two
# single-threaded classify workers with adaptive threads (so a lone request borrows
# the idle one's core). Perturbed texts are scored in fp32 whatever the CPU, so that
# per-request faithfulness can be recomputed exactly through the API's own predictions
# (bf16 scoring is compared with fp32 in tests/integration/test_service_classify_api.py).
SERVER_ENV = {
    "SUPPORTLENS_API_KEY": API_KEY,
    "SUPPORTLENS_API_SERVERS": "2",
    "SUPPORTLENS_WORKERS": "2",
    "SUPPORTLENS_ADAPTIVE_THREADS": "1",
    "SUPPORTLENS_MAX_TEXTS": "8",
    "SUPPORTLENS_MAX_BODY_BYTES": "20000",
    "SUPPORTLENS_MAX_IN_FLIGHT": "4",
    "SUPPORTLENS_REQUEST_TIMEOUT": "5",
    "SUPPORTLENS_IG_STEPS": "8",
    "SUPPORTLENS_MAX_REQUEST_COST": "5000",
    "SUPPORTLENS_MAX_CONVERSATION_TOKENS": "300",
    "SUPPORTLENS_LOG_LEVEL": "info",
    "SUPPORTLENS_FAITHFULNESS_PRECISION": "fp32",
}


@pytest.fixture(scope="session")
def server(tiny_bundles, tmp_path_factory):
    """The main test server (see ``SERVER_ENV``)."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    process = ServerProcess({**bundle_env(tiny_bundles), **SERVER_ENV}, log).wait_ready()
    yield process
    process.stop()


@pytest.fixture()
def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


def worker_pids(server: ServerProcess, api: str) -> list[int]:
    """PIDs of the workers of ``api`` (e.g. ``v1-classify``) that reported ready, in order
    (needs ``SUPPORTLENS_LOG_LEVEL=info``)."""
    text = server.log_path.read_text(errors="replace")
    return [
        int(pid) for pid in re.findall(rf"supportlens-worker-{api}-\d+ ready \(pid (\d+)\)", text)
    ]


def model_workers(pid: int) -> list:
    """The model worker processes (spawned children) of the server ``pid``."""
    import psutil

    return [
        child
        for child in psutil.Process(pid).children(recursive=True)
        if "spawn_main" in " ".join(child.cmdline())
    ]
