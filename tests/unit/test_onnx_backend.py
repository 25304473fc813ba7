"""The ONNX export and the ONNX Runtime backend on tiny random bundles.

Tolerances (largest absolute difference to PyTorch on inputs of another batch size and
length than the ones traced): fp32 1e-4 on logits and pooled features, 1e-5 on pooling
weights; int8 (dynamic, weights only) 0.25 on the logits of these tiny random models
and 0.05 on pooling weights. The int8 graph's accuracy on real data is measured by
``benchmarks/serving.py --backends``.
"""

import hashlib
import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from models.backbone import load_backbone
from models.bundle import BundleError, load_bundle, save_bundle, verify_bundle
from models.classifier import ClassifierConfig, IntentClassifier
from models.onnx_backend import (
    EXPORT_INFO,
    GRAPH_FILES,
    GRAPH_IO,
    NEIGHBOUR_GRAPH_FILES,
    OnnxBackendError,
    OnnxClassifier,
    OnnxSummarizer,
    onnx_runner,
)
from models.predictor import IntentPredictor
from models.summarizer import ExtractiveSummarizer, SummarizerConfig
from models.summary_predictor import SummarizerPredictor
from training import export_onnx
from training.out_of_scope import fit_detector

pytestmark = pytest.mark.unit
LABELS = ["refund", "shipping", "login", "card"]
TEXTS = [
    "I want my money back",
    "parcel late",
    "cannot log in!! my password does not work since yesterday evening",
]
CONVERSATIONS = [
    "Customer: Hi. Where is my parcel?\nAgent: It ships today.",
    "Customer: I was charged twice!\nAgent: Sorry. I refunded one.\nCustomer: Thanks. Bye.",
    "Customer: hello",
]
FP32 = {"logits": 1e-4, "pooled": 1e-4, "pooling_weights": 1e-5}
INT8 = {"logits": 0.25, "pooled": 0.25, "pooling_weights": 0.05}


@pytest.fixture(scope="module")
def exported(tiny_backbone, tmp_path_factory):
    """A classifier bundle (pooling over 2 heads, a k-NN detector) and a summarizer
    bundle, both exported with --int8."""
    root = tmp_path_factory.mktemp("onnx")
    encoder, tokenizer = load_backbone(str(tiny_backbone))
    torch.manual_seed(0)
    classifier = IntentClassifier(
        ClassifierConfig(
            num_labels=len(LABELS), pooling_heads=2, special_token_ids=tokenizer.all_special_ids
        ),
        encoder,
    ).eval()
    with torch.no_grad():
        pooled = classifier(
            **tokenizer(TEXTS, padding=True, return_tensors="pt"), output_pooled=True
        )
    detector = fit_detector("knn", pooled.pooled.numpy(), range(3), len(LABELS), k=2)
    intent = save_bundle(
        root / "intent",
        classifier,
        tokenizer,
        task="intent-classification",
        labels=LABELS,
        calibration={"temperature": 1.3, "oos_threshold": 0.1},
        training={"max_length": 32},
        detector=detector,
    )
    encoder, tokenizer = load_backbone(str(tiny_backbone))
    summarizer = ExtractiveSummarizer(
        SummarizerConfig(context_layers=1, context_heads=2, context_feedforward=64), encoder
    ).eval()
    summary = save_bundle(
        root / "summarizer",
        summarizer,
        tokenizer,
        task="extractive-summarization",
        training={"max_length": 24, "chunk_overlap": 4, "units": "sentences"},
    )
    for bundle in (intent, summary):
        assert export_onnx.main([str(bundle), "--int8"]) == 0
    return intent, summary


def _differences(expected: dict, actual: dict) -> dict:
    return {k: float(np.abs(actual[k] - v).max()) for k, v in expected.items()}


def _classifier_outputs(bundle, runner, texts):
    predictor = IntentPredictor(bundle)
    encoding, _ = predictor.encode(texts)
    inputs = predictor.model_inputs(encoding)
    with torch.inference_mode():
        out = runner(**inputs, output_pooling_weights=True, output_pooled=True)
    return {
        "logits": out.logits.numpy(),
        "pooling_weights": out.pooling_weights.numpy(),
        "pooled": out.pooled.numpy(),
    }


@pytest.mark.parametrize(("precision", "tolerance"), [("fp32", FP32), ("int8", INT8)])
def test_onnx_classifier_matches_pytorch_with_pooling_weights(exported, precision, tolerance):
    bundle = load_bundle(exported[0])
    assert set(bundle.onnx_graphs) == {"fp32", "int8"}
    runner = onnx_runner(bundle, precision, threads=1)
    assert isinstance(runner, OnnxClassifier)
    for texts in (TEXTS, TEXTS[:1], TEXTS * 3):  # batch sizes and lengths not traced
        expected = _classifier_outputs(bundle, bundle.model, texts)
        actual = _classifier_outputs(bundle, runner, texts)
        diffs = _differences(expected, actual)
        assert all(diffs[k] <= tolerance[k] for k in tolerance), diffs
        # The weights stay a distribution over the pooled tokens, zero elsewhere.
        weights = actual["pooling_weights"]
        np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-4)
        assert (weights[expected["pooling_weights"] == 0] == 0).all()


def test_onnx_predictor_gives_the_same_predictions_in_fp32(exported):
    bundle = load_bundle(exported[0])
    torch_predictions = IntentPredictor(bundle).predict(TEXTS, top_k=2)
    onnx_predictions = IntentPredictor(bundle, runner=onnx_runner(bundle, "fp32")).predict(
        TEXTS, top_k=2
    )
    for ours, theirs in zip(onnx_predictions, torch_predictions, strict=True):
        assert ours.label == theirs.label
        assert [e["label"] for e in ours.top_k] == [e["label"] for e in theirs.top_k]
        assert ours.score == pytest.approx(theirs.score, abs=1e-4)
        assert ours.ood_score == pytest.approx(theirs.ood_score, abs=1e-4)


@pytest.fixture(scope="module")
def voted(exported, tiny_backbone, tmp_path_factory):
    """The classifier bundle with a neighbour vote whose gate (2) makes every row unsure,
    exported with --int8."""
    from tests.conftest import add_neighbour_vote

    path = add_neighbour_vote(
        exported[0],
        tiny_backbone,
        TEXTS,
        [0, 1, 2],
        tmp_path_factory.mktemp("voted") / "bundle",
        k=1,
        gate=2.0,
    )
    assert export_onnx.main([str(path), "--int8"]) == 0
    return path


def test_export_writes_the_neighbour_vote_graph_in_each_precision(voted):
    bundle = load_bundle(voted)
    assert set(bundle.neighbour_graphs) == set(bundle.onnx_graphs) == {"fp32", "int8"}
    manifest = json.loads((voted / "manifest.json").read_text())
    for name in NEIGHBOUR_GRAPH_FILES.values():
        assert manifest["files"][name] == hashlib.sha256((voted / name).read_bytes()).hexdigest()
    info = json.loads((voted / EXPORT_INFO).read_text())["neighbours"]
    assert max(info["fp32"]["max_abs_difference"].values()) <= export_onnx.FP32_TOLERANCE
    assert info["int8"]["quantization"]["excluded_nodes"] == 0  # no pooling or head in it


@pytest.mark.parametrize(("precision", "tolerance"), [("fp32", 1e-4), ("int8", 0.25)])
def test_onnx_backend_runs_the_neighbour_vote_on_its_own_graph(
    voted, exported, precision, tolerance, monkeypatch
):
    bundle = load_bundle(voted)
    plain = IntentPredictor(load_bundle(exported[0])).predict(TEXTS, top_k=1)
    torch_predictions = IntentPredictor(bundle).predict(TEXTS, top_k=1)
    runner = onnx_runner(bundle, precision)
    assert runner.neighbour_embed is not None
    # Two sessions in one process: neither spins, so neither holds the other's cores.
    for session in (runner.session, runner.neighbour_embed.session):
        options = session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"

    def refuse(*args, **kwargs):
        raise AssertionError("the vote's PyTorch encoder ran under the ONNX backend")

    # The PyTorch encoder of the vote would have cost the int8 backend over a third of
    # its throughput on BANKING77: the ONNX runner must not fall back to it.
    monkeypatch.setattr(bundle.model.neighbours.encoder, "forward", refuse)
    onnx_predictions = IntentPredictor(bundle, runner=runner).predict(TEXTS, top_k=1)
    for ours, theirs, alone in zip(onnx_predictions, torch_predictions, plain, strict=True):
        assert ours.score == pytest.approx(theirs.score, abs=tolerance)
        assert theirs.score != pytest.approx(alone.score, abs=1e-3)  # the vote changed it


def test_bundle_refuses_a_neighbour_vote_without_its_graph(voted, tmp_path):
    path = _bundle_copy(voted, tmp_path)
    name = NEIGHBOUR_GRAPH_FILES["int8"]
    (path / name).unlink()
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["files"][name]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError) as refused:
        load_bundle(path)
    message = str(refused.value)
    assert f"its neighbour vote has no int8 ONNX graph ({name})" in message
    assert f"export again with: supportlens-export-onnx {path}" in message


def test_bundle_refuses_a_neighbour_graph_without_a_vote_or_of_the_wrong_kind(
    voted, exported, tmp_path
):
    path = _bundle_copy(exported[0], tmp_path)
    name = NEIGHBOUR_GRAPH_FILES["fp32"]
    shutil.copyfile(voted / name, path / name)
    _resign(path, name)
    with pytest.raises(BundleError, match=rf"{name} without a neighbour vote in config\.json"):
        verify_bundle(path)
    path = _bundle_copy(voted, tmp_path / "other")
    shutil.copyfile(voted / GRAPH_FILES["fp32"], path / name)  # the classifier's graph
    _resign(path, name)
    with pytest.raises(BundleError, match=rf"{name} has inputs .*\['embeddings'\]"):
        verify_bundle(path)


@pytest.mark.parametrize(("precision", "tolerance"), [("fp32", FP32), ("int8", INT8)])
def test_onnx_summarizer_matches_pytorch(exported, precision, tolerance):
    bundle = load_bundle(exported[1])
    runner = onnx_runner(bundle, precision)
    assert isinstance(runner, OnnxSummarizer)
    torch_predictor = SummarizerPredictor(bundle)
    onnx_predictor = SummarizerPredictor(bundle, runner=runner)
    # Three conversations (two traced), one of them longer than a chunk.
    long = "Customer: " + " ".join(f"Sentence number {i} is here." for i in range(12))
    for texts in (CONVERSATIONS, [long], [*CONVERSATIONS, long]):
        encoded = torch_predictor.encode(torch_predictor.segment(texts))
        with torch.inference_mode():
            expected = bundle.model(**encoded.tensors, output_pooling_weights=True)
        actual = runner(**encoded.tensors, output_pooling_weights=True)
        unit = encoded.tensors["unit_mask"]
        diffs = {
            "logits": float((actual.logits - expected.logits)[unit].abs().max()),
            "pooling_weights": float(
                (actual.pooling_weights - expected.pooling_weights).abs().max()
            ),
        }
        assert all(diffs[k] <= tolerance[k] for k in diffs), diffs
    if precision == "fp32":
        ours = onnx_predictor.summarize(CONVERSATIONS, max_sentences=1, explain=["attention"])
        theirs = torch_predictor.summarize(CONVERSATIONS, max_sentences=1, explain=["attention"])
        assert [r.summary for r in ours] == [r.summary for r in theirs]


def test_export_records_its_checks_in_the_manifest(exported):
    for path in exported:
        manifest = json.loads((path / "manifest.json").read_text())
        for name in (*GRAPH_FILES.values(), EXPORT_INFO):
            digest = hashlib.sha256((path / name).read_bytes()).hexdigest()
            assert manifest["files"][name] == digest
        info = json.loads((path / EXPORT_INFO).read_text())
        fp32 = info["graphs"]["fp32"]["max_abs_difference"]
        assert max(fp32.values()) <= export_onnx.FP32_TOLERANCE
        assert info["graphs"]["int8"]["quantization"]["op_types"] == ["MatMul"]
        verify_bundle(path)


def _bundle_copy(source, tmp_path):
    target = tmp_path / "bundle"
    shutil.copytree(source, target)
    return target


def _resign(path, name):
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"][name] = hashlib.sha256((path / name).read_bytes()).hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_bundle_refuses_a_graph_with_other_output_names(exported, tmp_path):
    path = _bundle_copy(exported[0], tmp_path)
    graph = onnx.load(str(path / GRAPH_FILES["fp32"]))
    graph.graph.output[1].name = "attention"  # a graph that lost its pooling weights output
    onnx.save(graph, str(path / GRAPH_FILES["fp32"]))
    _resign(path, GRAPH_FILES["fp32"])
    with pytest.raises(BundleError) as refused:
        load_bundle(path)
    message = str(refused.value)
    assert "onnx/model.onnx has inputs" in message and "pooling_weights" in message
    assert "\n" not in message


def test_bundle_refuses_a_graph_of_the_other_task(exported, tmp_path):
    path = _bundle_copy(exported[0], tmp_path)
    shutil.copyfile(exported[1] / GRAPH_FILES["int8"], path / GRAPH_FILES["int8"])
    _resign(path, GRAPH_FILES["int8"])
    with pytest.raises(BundleError, match=r"onnx/model\.int8\.onnx has inputs"):
        verify_bundle(path)


def test_bundle_refuses_an_unknown_or_unreadable_onnx_file(exported, tmp_path):
    path = _bundle_copy(exported[0], tmp_path)
    (path / "onnx" / "extra.onnx").write_bytes(b"not a graph")
    _resign(path, "onnx/extra.onnx")
    with pytest.raises(BundleError, match=r"onnx/extra\.onnx is not a known ONNX file"):
        verify_bundle(path)
    (path / "onnx" / "extra.onnx").unlink()
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["files"]["onnx/extra.onnx"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    (path / GRAPH_FILES["int8"]).write_bytes(b"\x08garbage")
    _resign(path, GRAPH_FILES["int8"])
    with pytest.raises(BundleError, match=r"onnx/model\.int8\.onnx is not a readable ONNX model"):
        verify_bundle(path)


def test_bundle_refuses_a_hand_made_graph_with_wrong_inputs(exported, tmp_path):
    path = _bundle_copy(exported[0], tmp_path)
    node = helper.make_node("Identity", ["tokens"], ["logits"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, [None, None])],
        [helper.make_tensor_value_info("logits", TensorProto.INT64, [None, None])],
    )
    onnx.save(helper.make_model(graph), str(path / GRAPH_FILES["fp32"]))
    _resign(path, GRAPH_FILES["fp32"])
    with pytest.raises(BundleError) as refused:
        verify_bundle(path)
    assert str(list(GRAPH_IO["intent-classification"][0])) in str(refused.value)


def test_bundle_without_a_graph_names_the_export_command(exported, tmp_path):
    path = _bundle_copy(exported[0], tmp_path)
    shutil.rmtree(path / "onnx")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("onnx/")}
    (path / "manifest.json").write_text(json.dumps(manifest))
    bundle = load_bundle(path)
    assert bundle.onnx_graphs == {}
    with pytest.raises(OnnxBackendError) as missing:
        onnx_runner(bundle, "int8")
    assert f"export it with: supportlens-export-onnx {path} --int8" in str(missing.value)
    with pytest.raises(OnnxBackendError, match="unknown ONNX precision 'int4'"):
        onnx_runner(bundle, "int4")


def test_export_without_int8_writes_only_fp32_and_replaces_the_old_graphs(exported, tmp_path):
    path = _bundle_copy(exported[0], tmp_path)
    assert export_onnx.main([str(path)]) == 0
    bundle = load_bundle(path)
    assert set(bundle.onnx_graphs) == {"fp32"}
    assert not (path / GRAPH_FILES["int8"]).exists()


def test_export_cli_refuses_a_missing_bundle_with_one_line(tmp_path, capsys):
    assert export_onnx.main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no model bundle at") and "\n" not in err


def test_export_failure_leaves_the_bundle_unchanged(exported, tmp_path, monkeypatch):
    path = _bundle_copy(exported[0], tmp_path)
    before = (path / "manifest.json").read_bytes()

    def broken(*args, **kwargs):
        raise BundleError("the fp32 ONNX graph differs from PyTorch")

    monkeypatch.setattr(export_onnx, "differences", broken)
    assert export_onnx.main([str(path), "--int8"]) == 2
    assert (path / "manifest.json").read_bytes() == before
    verify_bundle(path)
    assert not list(tmp_path.glob(".bundle.*"))


def test_onnx_session_uses_the_workers_thread_count(exported):
    bundle = load_bundle(exported[0])
    for threads in (1, 3):
        options = onnx_runner(bundle, "int8", threads=threads).session.get_session_options()
        assert (options.intra_op_num_threads, options.inter_op_num_threads) == (threads, 1)
