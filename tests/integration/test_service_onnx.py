"""The server with SUPPORTLENS_BACKEND=onnx: the same answers as PyTorch, ONNX Runtime
in the plain-prediction workers only, and one-line refusals of unusable settings."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from models.bundle import load_bundle
from models.predictor import IntentPredictor
from models.summary_predictor import SummarizerPredictor
from tests.integration.conftest import ServerProcess, bundle_env, worker_pids
from training import export_onnx

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TEXTS = ["I lost my card yesterday", "where is my refund??", "top up failed", "hello there"]
CONVERSATION = (
    "Customer: My transfer failed twice. I need it today.\n"
    "Agent: Sorry about that. I have retried it and it went through.\nCustomer: Thanks!"
)


@pytest.fixture(scope="module")
def exported_bundles(tiny_bundles, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx-bundles")
    copies = []
    for bundle in tiny_bundles:
        copy = root / bundle.name
        shutil.copytree(bundle, copy)
        assert export_onnx.main([str(copy), "--int8"]) == 0
        copies.append(copy)
    return tuple(copies)


@pytest.fixture(scope="module")
def onnx_server(exported_bundles, tmp_path_factory):
    log = tmp_path_factory.mktemp("onnx-server") / "server.log"
    env = {
        **bundle_env(exported_bundles),
        "SUPPORTLENS_BACKEND": "onnx",
        "SUPPORTLENS_ONNX_PRECISION": "fp32",
        "SUPPORTLENS_LOG_LEVEL": "info",
    }
    process = ServerProcess(env, log).wait_ready()
    yield process
    process.stop()


def _loaded_libraries(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_onnx_server_classifies_with_the_same_labels_as_pytorch(onnx_server, exported_bundles):
    bundle = load_bundle(exported_bundles[0])
    expected = IntentPredictor(bundle).predict(TEXTS, top_k=3)
    answer = requests.post(
        f"{onnx_server.url}/v1/classify",
        json={"texts": TEXTS, "top_k": 3, "explain": ["attention"]},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert [r["label"] for r in results] == [p.label for p in expected]
    for result, prediction in zip(results, expected, strict=True):
        assert [e["label"] for e in result["top_k"]] == [e["label"] for e in prediction.top_k]
        assert result["score"] == pytest.approx(prediction.score, abs=1e-4)
        words = result["explanations"]["attention"]["words"]
        assert words and all(w["score"] >= 0 for w in words)
    # The plain-prediction worker runs ONNX Runtime; the explanation worker does not.
    (plain,) = worker_pids(onnx_server, "v1-classify")
    assert "onnxruntime" in _loaded_libraries(plain)
    (explaining,) = worker_pids(onnx_server, "v1-classify-explain")
    assert "onnxruntime" not in _loaded_libraries(explaining)


def test_onnx_server_keeps_gradient_explanations_on_pytorch(onnx_server):
    answer = requests.post(
        f"{onnx_server.url}/v1/classify",
        json={"text": TEXTS[0], "explain": ["gradient_x_input"]},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["results"][0]["explanations"]["gradient_x_input"]["words"]


def test_onnx_server_summarizes_like_pytorch(onnx_server, exported_bundles):
    expected = SummarizerPredictor(load_bundle(exported_bundles[1])).summarize(
        [CONVERSATION], max_sentences=2
    )
    answer = requests.post(
        f"{onnx_server.url}/v1/summarize",
        json={"texts": [CONVERSATION], "max_sentences": 2},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["results"][0]["summary"] == expected[0].summary
    (worker,) = worker_pids(onnx_server, "v1-summarize")
    assert "onnxruntime" in _loaded_libraries(worker)


def _refusal(env: dict[str, str]) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "service.server"],
        cwd=REPO,
        env={**os.environ, "SUPPORTLENS_PORT": "8797", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_onnx_backend_without_a_graph_stops_the_server_with_one_line(tiny_bundles):
    line = _refusal({**bundle_env(tiny_bundles), "SUPPORTLENS_BACKEND": "onnx"})
    assert line.startswith("supportlens-serve: SUPPORTLENS_INTENT_BUNDLE: bundle ")
    assert f"export it with: supportlens-export-onnx {tiny_bundles[0]} --int8" in line


def test_bad_backend_setting_stops_the_server_with_one_line(tiny_bundles):
    line = _refusal({**bundle_env(tiny_bundles), "SUPPORTLENS_BACKEND": "onnxruntime"})
    assert line == (
        "supportlens-serve: SUPPORTLENS_BACKEND must be one of torch, onnx, got 'onnxruntime'"
    )


def test_backends_benchmark_scores_each_backend_on_labelled_texts(exported_bundles):
    from benchmarks.serving import BACKENDS, backend_quality

    bundle = load_bundle(exported_bundles[0])
    texts = TEXTS * 5
    labels = [p.label for p in IntentPredictor(bundle).predict(texts)]  # PyTorch's labels
    quality = {
        backend: backend_quality(str(exported_bundles[0]), backend, texts, labels, threads=1)
        for backend in BACKENDS
    }
    assert quality["torch"]["accuracy"] == quality["onnx-fp32"]["accuracy"] == 100.0
    assert quality["onnx-fp32"]["predicted"] == quality["torch"]["predicted"]
    for backend in BACKENDS:
        assert 0 <= quality[backend]["ece_after"] <= 100
        assert len(quality[backend]["predicted"]) == len(texts)
