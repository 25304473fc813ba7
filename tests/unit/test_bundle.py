import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

import models  # noqa: F401 - registers the model types with the Auto classes
from models.backbone import load_backbone
from models.bundle import BUNDLE_FORMAT, BundleError, load_bundle, save_bundle, verify_bundle
from models.classifier import ClassifierConfig, IntentClassifier
from models.ood import METHODS
from models.predictor import OUT_OF_SCOPE, IntentPredictor
from models.summarizer import ExtractiveSummarizer, SummarizerConfig
from training.out_of_scope import fit_detector

pytestmark = pytest.mark.unit
LABELS = ["refund", "shipping", "login"]
TEXTS = ["I want my money back", "parcel late", "cannot log in!!"]


@pytest.fixture()
def classifier(tiny_backbone):
    encoder, tokenizer = load_backbone(str(tiny_backbone))
    config = ClassifierConfig(
        num_labels=3, pooling_heads=2, special_token_ids=tokenizer.all_special_ids
    )
    torch.manual_seed(0)
    return IntentClassifier(config, encoder).eval(), tokenizer


def _save(tmp_path, classifier, **kwargs):
    model, tokenizer = classifier
    return save_bundle(
        tmp_path / "bundle",
        model,
        tokenizer,
        task="intent-classification",
        labels=LABELS,
        calibration={"temperature": 1.5, "oos_threshold": 0.2},
        **kwargs,
    )


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _write_manifest(path: Path, manifest: dict) -> None:
    (path / "manifest.json").write_text(json.dumps(manifest))


def _rewrite(path: Path, name: str, data: bytes) -> None:
    """Replace a bundle file and re-sign it in the manifest (checksums alone then pass)."""
    (path / name).write_bytes(data)
    manifest = _manifest(path)
    manifest["files"][name] = _sha(path / name)
    _write_manifest(path, manifest)


def _refusal(path, **kwargs) -> str:
    """The one-line message of a refused bundle, the same from verify and load."""
    with pytest.raises(BundleError) as verified:
        verify_bundle(path, **kwargs)
    with pytest.raises(BundleError) as loaded:
        load_bundle(path, **kwargs)
    message = str(verified.value)
    assert message == str(loaded.value)
    assert "\n" not in message
    return message


# -- the Hugging Face model and the round trip ---------------------------------------------


def test_classifier_excludes_special_tokens_and_padding(classifier):
    model, tokenizer = classifier
    batch = tokenizer(["where is my parcel", "hi"], padding=True, return_tensors="pt")
    out = model(**batch, output_pooling_weights=True)
    special = torch.isin(batch["input_ids"], torch.tensor(tokenizer.all_special_ids))
    assert (out.pooling_weights.permute(0, 2, 1)[special] == 0).all()
    assert torch.allclose(out.pooling_weights.sum(-1), torch.ones(2, 2))


def test_classifier_keeps_the_pretrained_encoder_it_wraps(tiny_backbone):
    encoder, _ = load_backbone(str(tiny_backbone))
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    model = IntentClassifier(ClassifierConfig(num_labels=4), encoder)
    for name, value in model.encoder.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert model.config.encoder is model.encoder.config


def test_classifier_rdrop_adds_the_kl_of_two_dropout_passes(classifier):
    model, tokenizer = classifier
    batch = tokenizer(["where is my parcel", "hi"], padding=True, return_tensors="pt")
    labels = torch.tensor([0, 2])
    model.config.rdrop_alpha, model.config.label_smoothing = 4.0, 0.1
    model.train()
    torch.manual_seed(1)
    out = model(**batch, labels=labels, output_pooling_weights=True)
    # The same two passes by hand: the batch twice in one call draws the same dropout masks.
    model.config.rdrop_alpha = 0.0
    torch.manual_seed(1)
    twice = model(**{k: v.repeat(2, 1) for k, v in batch.items()}).logits
    first, second = twice.float().log_softmax(-1).chunk(2)
    ce = torch.nn.functional.cross_entropy(twice.float(), labels.repeat(2), label_smoothing=0.1)
    kl = (first.exp() * (first - second)).sum(-1) + (second.exp() * (second - first)).sum(-1)
    assert out.logits.shape == (2, 3) and out.pooling_weights.shape[0] == 2
    assert torch.allclose(out.logits, twice[:2])
    assert not torch.allclose(twice[:2], twice[2:])  # the masks differed
    assert torch.allclose(out.loss, ce + 4.0 * kl.mean() / 2, atol=1e-5)
    # Inference never doubles the batch.
    model.config.rdrop_alpha = 4.0
    model.eval()
    evaluated = model(**batch, labels=labels)
    assert evaluated.logits.shape == (2, 3)
    assert torch.allclose(
        evaluated.loss,
        torch.nn.functional.cross_entropy(evaluated.logits, labels, label_smoothing=0.1),
    )


def test_classifier_distillation_mixes_the_label_loss_with_the_teachers_kl(classifier):
    model, tokenizer = classifier
    batch = tokenizer(["where is my parcel", "hi"], padding=True, return_tensors="pt")
    labels, teacher = torch.tensor([0, 2]), torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    model.config.distillation_alpha, model.config.distillation_temperature = 0.25, 2.0
    model.train()
    torch.manual_seed(1)
    out = model(**batch, labels=labels, teacher_logits=teacher)
    torch.manual_seed(1)  # the same dropout masks, without the teacher
    plain = model(**batch, labels=labels)
    assert torch.allclose(out.logits, plain.logits)
    student, target = (plain.logits.float() / 2).log_softmax(-1), (teacher / 2).softmax(-1)
    kl = (target * (target.log() - student)).sum(-1).mean()
    assert torch.allclose(out.loss, 0.75 * plain.loss + 0.25 * 4 * kl, atol=1e-5)
    assert not torch.allclose(out.loss, plain.loss)
    # Evaluation scores the labels only.
    model.eval()
    evaluated = model(**batch, labels=labels, teacher_logits=teacher)
    assert torch.allclose(evaluated.loss, model(**batch, labels=labels).loss)


def test_bundle_round_trip_gives_identical_predictions(tmp_path, classifier):
    path = _save(tmp_path, classifier)
    loaded = load_bundle(path, task="intent-classification")
    model, tokenizer = classifier
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        assert torch.equal(model(**batch).logits, loaded.model(**batch).logits)
    assert loaded.labels == LABELS
    predictions = IntentPredictor(loaded).predict(TEXTS, top_k=2)
    assert [len(p.top_k) for p in predictions] == [2, 2, 2]
    assert all(p.label in {*LABELS, OUT_OF_SCOPE} for p in predictions)
    assert not list(tmp_path.glob(".bundle.tmp-*"))


def test_bundle_is_a_hugging_face_directory_with_identical_logits(tmp_path, classifier):
    # With an out-of-scope detector too: the Auto classes read the model files only.
    path = _save(tmp_path, classifier, detector=_detector(classifier, "mahalanobis"))
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "supportlens-intent-classifier"
    assert config["encoder"]["model_type"] == "bert"
    assert config["id2label"] == {"0": "refund", "1": "shipping", "2": "login"}
    assert _manifest(path)["format"] == BUNDLE_FORMAT == 2
    assert not list(path.glob("*.bin")) and not list(path.glob("*.pt"))

    loaded = load_bundle(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert isinstance(AutoConfig.from_pretrained(path), ClassifierConfig)
    with torch.inference_mode():
        expected = loaded.model(**batch).logits
        for auto_class in (AutoModel, AutoModelForSequenceClassification):
            model = auto_class.from_pretrained(path).eval()
            assert isinstance(model, IntentClassifier)
            torch.testing.assert_close(model(**batch).logits, expected)


def test_summarizer_bundle_loads_with_automodel(tmp_path, tiny_backbone):
    from models.segmentation import segment
    from models.summarizer import encode_conversations

    encoder, tokenizer = load_backbone(str(tiny_backbone))
    torch.manual_seed(0)
    model = ExtractiveSummarizer(
        SummarizerConfig(context_layers=1, context_heads=2, context_feedforward=64), encoder
    ).eval()
    path = save_bundle(tmp_path / "summarizer", model, tokenizer, task="extractive-summarization")
    batch = encode_conversations(
        tokenizer, [segment("Customer: hi there.\nAgent: hello, how can I help?")], max_length=32
    ).tensors
    with torch.inference_mode():
        expected = load_bundle(path).model(**batch).logits
        auto = AutoModel.from_pretrained(path).eval()
        assert isinstance(auto, ExtractiveSummarizer)
        assert torch.equal(auto(**batch).logits, expected)
        torch.testing.assert_close(model(**batch).logits, expected)


def test_bundle_loads_with_eager_attention_on_request(tmp_path, classifier):
    path = _save(tmp_path, classifier)
    bundle = load_bundle(path, attn_implementation="eager")
    assert bundle.model.encoder.config._attn_implementation == "eager"


# -- checksums, formats, atomic writes ------------------------------------------------------


def test_bundle_refuses_corrupt_weights(tmp_path, classifier):
    path = _save(tmp_path, classifier)
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert "checksum mismatch for model.safetensors" in _refusal(path)


def test_bundle_refuses_missing_listed_file_and_missing_dir(tmp_path, classifier):
    path = _save(tmp_path, classifier)
    (path / "calibration.json").unlink()
    assert "calibration.json is missing" in _refusal(path)
    assert "does not exist" in _refusal(tmp_path / "nowhere")


def test_bundle_unreadable_file_is_one_line(tmp_path, classifier, monkeypatch):
    # Tests run as root, which reads any file whatever its mode: make the read fail instead.
    import models.bundle

    path = _save(tmp_path, classifier)

    def denied(file):
        raise PermissionError(13, "Permission denied", str(file))

    monkeypatch.setattr(models.bundle, "sha256_file", denied)
    message = _refusal(path)
    assert re.fullmatch(r"unreadable bundle .+: [\w.]+: Permission denied", message)


def test_bundle_refuses_wrong_task_and_format(tmp_path, classifier):
    path = _save(tmp_path, classifier)
    assert "expected 'extractive-summarization'" in _refusal(path, task="extractive-summarization")
    manifest = _manifest(path)
    manifest["format"] = 99
    _write_manifest(path, manifest)
    assert "format 99" in _refusal(path)


def test_bundle_save_replaces_existing_atomically(tmp_path, classifier):
    first = _save(tmp_path, classifier, metrics={"accuracy": 0.5})
    second = _save(tmp_path, classifier, metrics={"accuracy": 0.9})
    assert first == second
    assert json.loads((second / "metrics.json").read_text()) == {"accuracy": 0.9}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_bundle_save_clears_temporaries_of_an_interrupted_write(tmp_path, classifier):
    stale = tmp_path / ".bundle.tmp-deadbeef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    _save(tmp_path, classifier)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


# -- forged manifests -----------------------------------------------------------------------


@pytest.mark.parametrize("outside", ["../../../../etc/hostname", "/etc/hostname", "a/../../x"])
def test_manifest_paths_outside_the_bundle_are_refused_without_naming_them(
    tmp_path, classifier, outside
):
    path = _save(tmp_path, classifier)
    target = Path("/etc/hostname")
    manifest = _manifest(path)
    # With the right checksum, as someone probing the machine would write it.
    manifest["files"][outside] = _sha(target) if target.is_file() else "0" * 64
    _write_manifest(path, manifest)
    message = _refusal(path).replace(str(path), "BUNDLE")
    assert "outside the bundle" in message
    assert "hostname" not in message and "etc" not in message


def test_manifest_wrong_checksum_of_outside_file_reveals_nothing(tmp_path, classifier):
    path = _save(tmp_path, classifier)
    manifest = _manifest(path)
    manifest["files"]["../secret.txt"] = "0" * 64
    (tmp_path / "secret.txt").write_text("secret")
    _write_manifest(path, manifest)
    message = _refusal(path).replace(str(path), "BUNDLE")
    assert "secret" not in message and "checksum" not in message


def test_symlink_leaving_the_bundle_is_refused(tmp_path, classifier):
    path = _save(tmp_path, classifier)
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    (path / "metrics.json").unlink()
    os.symlink(outside, path / "metrics.json")
    manifest = _manifest(path)
    manifest["files"]["metrics.json"] = _sha(outside)
    _write_manifest(path, manifest)
    message = _refusal(path).replace(str(path), "BUNDLE")
    assert "metrics.json is a symbolic link leading out of the bundle" in message
    assert "outside.json" not in message


def test_unlisted_file_in_the_bundle_is_refused(tmp_path, classifier):
    path = _save(tmp_path, classifier)
    (path / "extra.py").write_text("print('hello')\n")
    assert "extra.py is in the bundle but not in its manifest.json" in _refusal(path)


@pytest.mark.parametrize(
    ("files", "wanted"),
    [(None, "got NoneType"), ([], "got list"), ({}, "got dict"), ("x", "got str")],
)
def test_manifest_with_unusable_files_entry_is_refused(tmp_path, classifier, files, wanted):
    path = _save(tmp_path, classifier)
    manifest = _manifest(path)
    manifest["files"] = files
    _write_manifest(path, manifest)
    message = _refusal(path)
    assert "'files' must map relative paths to SHA-256 checksums" in message and wanted in message


@pytest.mark.parametrize("manifest", ["[1, 2]", "{not json", '{"format": 2}'])
def test_manifest_that_is_not_a_manifest_is_refused(tmp_path, classifier, manifest):
    path = _save(tmp_path, classifier)
    (path / "manifest.json").write_text(manifest)
    assert "manifest.json" in _refusal(path)


# -- inconsistent bundles whose checksums pass ----------------------------------------------


def test_labels_removed_from_the_config_are_refused(tmp_path, classifier):
    path = _save(tmp_path, classifier)
    config = json.loads((path / "config.json").read_text())
    del config["id2label"]
    _rewrite(path, "config.json", json.dumps(config).encode())
    assert "inconsistent bundle" in _refusal(path)


def test_labels_fewer_than_the_head_are_refused(tmp_path, classifier):
    path = _save(tmp_path, classifier)
    config = json.loads((path / "config.json").read_text())
    config["id2label"] = {"0": "refund", "1": "shipping"}
    config.pop("label2id", None)
    _rewrite(path, "config.json", json.dumps(config).encode())
    message = _refusal(path)
    assert "model.safetensors has head.weight of shape [3, 64], config.json needs [2, 64]" in (
        message
    )


def test_repeated_labels_are_refused(tmp_path, classifier):
    path = _save(tmp_path, classifier)
    config = json.loads((path / "config.json").read_text())
    config["id2label"] = {"0": "refund", "1": "refund", "2": "login"}
    config.pop("label2id", None)
    _rewrite(path, "config.json", json.dumps(config).encode())
    assert "empty or repeated labels" in _refusal(path)


def test_tokenizer_larger_than_the_embeddings_is_refused(tmp_path, classifier):
    path = _save(tmp_path, classifier)
    weights = load_file(str(path / "model.safetensors"))
    name = "encoder.embeddings.word_embeddings.weight"
    weights[name] = weights[name][:1000].clone()
    save_file(weights, str(path / "weights.tmp"))
    config = json.loads((path / "config.json").read_text())
    config["encoder"]["vocab_size"] = 1000
    _rewrite(path, "model.safetensors", (path / "weights.tmp").read_bytes())
    (path / "weights.tmp").unlink()
    _rewrite(path, "config.json", json.dumps(config).encode())
    message = _refusal(path)
    assert "the tokenizer has 30522 tokens but the encoder's embedding has 1000 rows" in message


def test_missing_tokenizer_is_refused(tmp_path, classifier):
    path = _save(tmp_path, classifier)
    manifest = _manifest(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).unlink()
        del manifest["files"][name]
    _write_manifest(path, manifest)
    assert "tokenizer_config.json is missing" in _refusal(path)


def test_corrupt_safetensors_header_is_refused(tmp_path, classifier):
    path = _save(tmp_path, classifier)
    data = bytearray((path / "model.safetensors").read_bytes())
    data[8:16] = b"@@@@@@@@"
    _rewrite(path, "model.safetensors", bytes(data))
    assert "model.safetensors has an unreadable header" in _refusal(path)


def test_task_that_does_not_match_the_model_is_refused(tmp_path, classifier):
    path = _save(tmp_path, classifier)
    manifest = _manifest(path)
    manifest["task"] = "extractive-summarization"
    _write_manifest(path, manifest)
    message = _refusal(path)
    assert "model_type 'supportlens-intent-classifier'" in message
    assert "needs 'supportlens-extractive-summarizer'" in message


def test_bad_calibration_is_refused(tmp_path, classifier):
    path = _save(tmp_path, classifier)
    _rewrite(path, "calibration.json", b'{"temperature": -1, "oos_threshold": 0.2}')
    assert "temperature must be a positive number" in _refusal(path)


def test_verify_returns_the_config_and_reads_no_weights(tmp_path, classifier, monkeypatch):
    import safetensors.torch

    path = _save(tmp_path, classifier)

    def refuse(*_args, **_kwargs):
        raise AssertionError("verify_bundle must not load the weights")

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    config = verify_bundle(path, task="intent-classification")
    assert config["model_type"] == "supportlens-intent-classifier"


def test_save_refuses_labels_that_do_not_fit_the_head(tmp_path, classifier):
    model, tokenizer = classifier
    with pytest.raises(BundleError, match="2 labels for a classifier head of 3 classes"):
        save_bundle(
            tmp_path / "b", model, tokenizer, task="intent-classification", labels=["a", "b"]
        )
    assert not (tmp_path / "b").exists()


def test_copied_bundle_still_verifies(tmp_path, classifier):
    path = _save(tmp_path, classifier)
    copy = shutil.copytree(path, tmp_path / "copy")
    assert verify_bundle(copy)["model_type"] == "supportlens-intent-classifier"


# -- the server refuses what verify_bundle refuses ------------------------------------------


def _forge_outside_path(path: Path) -> None:
    manifest = _manifest(path)
    manifest["files"]["../../../../etc/hostname"] = "0" * 64
    _write_manifest(path, manifest)


def _cut_labels(path: Path) -> None:
    config = json.loads((path / "config.json").read_text())
    config["id2label"] = {"0": "refund"}
    config.pop("label2id", None)
    _rewrite(path, "config.json", json.dumps(config).encode())


@pytest.mark.parametrize(
    ("damage", "wanted"),
    [(_forge_outside_path, "outside the bundle"), (_cut_labels, "model.safetensors has head")],
)
def test_server_refuses_a_bad_bundle_with_one_line_and_exit_2(tmp_path, classifier, damage, wanted):
    import subprocess
    import sys

    path = _save(tmp_path, classifier)
    damage(path)
    env = {
        **os.environ,
        "SUPPORTLENS_INTENT_BUNDLE": str(path),
        "SUPPORTLENS_SUMMARIZER_BUNDLE": "none",
        "SUPPORTLENS_PORT": "1",  # never bound: the bundle is refused first
    }
    completed = subprocess.run(
        [sys.executable, "-m", "service.server"],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and wanted in lines[0], completed.stderr[-2000:]
    assert "Traceback" not in completed.stderr


def test_symlink_loop_or_dangling_link_is_refused(tmp_path, classifier):
    path = _save(tmp_path, classifier)
    os.symlink(path / "loop-b", path / "loop-a")
    os.symlink(path / "loop-a", path / "loop-b")
    assert re.search(r"loop-[ab] is a dangling or looping symbolic link", _refusal(path))


def test_symlink_inside_the_bundle_is_accepted(tmp_path, classifier):
    path = _save(tmp_path, classifier)
    (path / "metrics.json").rename(path / "metrics-real.json")
    os.symlink("metrics-real.json", path / "metrics.json")
    manifest = _manifest(path)
    manifest["files"]["metrics-real.json"] = manifest["files"]["metrics.json"]
    _write_manifest(path, manifest)
    assert load_bundle(path).metrics == {}


# -- the out-of-scope detector in the bundle ------------------------------------------------

FIT_TEXTS = [
    "refund please", "money back now", "return my money",
    "where is my parcel", "shipping is slow", "package late",
    "password reset", "cannot sign in", "login broken",
]  # fmt: skip


def _pooled(model, tokenizer, texts):
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        output = model(**batch, output_pooled=True)
    return output.pooled, torch.softmax(output.logits / 1.5, dim=-1)


def _detector(classifier, method, threshold=0.5):
    model, tokenizer = classifier
    pooled, _ = _pooled(model, tokenizer, FIT_TEXTS)
    detector = fit_detector(method, pooled.numpy(), np.repeat([0, 1, 2], 3), 3, k=2)
    detector.threshold.fill_(threshold)
    return detector


def test_classifier_returns_pooled_features_only_when_asked(classifier):
    model, tokenizer = classifier
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        plain = model(**batch)
        output = model(**batch, output_pooled=True)
        head = model.head(output.pooled)
    assert plain.pooled is None and len(plain.to_tuple()) == 1
    assert output.pooled.shape == (3, 2 * model.config.hidden_size)  # pooling_heads=2
    torch.testing.assert_close(head, output.logits)  # eval mode: no dropout


@pytest.mark.parametrize("method", METHODS)
def test_detector_stored_in_the_bundle_scores_identically(tmp_path, classifier, method):
    detector = _detector(classifier, method)
    path = _save(tmp_path, classifier, detector=detector)
    assert "ood.safetensors" in _manifest(path)["files"]
    loaded = load_bundle(path)
    settings = loaded.calibration["ood"]
    assert settings["method"] == method and settings["threshold"] == 0.5
    assert loaded.calibration["oos_threshold"] == 0.2  # the older rule is kept next to it
    pooled, probs = _pooled(*classifier, TEXTS)
    expected, flags = detector(pooled, probs)
    got, loaded_flags = loaded.detector(pooled, probs)
    assert torch.equal(expected, got) and torch.equal(flags, loaded_flags)

    # Predictions carry the detector's score, computed in the same forward pass.
    predictions = IntentPredictor(loaded).predict(TEXTS)
    assert [p.ood_score for p in predictions] == pytest.approx(expected.tolist(), abs=1e-5)
    assert [p.out_of_scope for p in predictions] == flags.tolist()
    assert all((p.label == OUT_OF_SCOPE) == p.out_of_scope for p in predictions)


def test_predictions_need_the_features_a_detector_reads(tmp_path, classifier):
    path = _save(tmp_path, classifier, detector=_detector(classifier, "knn"))
    predictor = IntentPredictor(load_bundle(path))
    assert predictor.needs_features
    encoding, truncated = predictor.encode(TEXTS)
    output = predictor.forward(encoding)
    assert output.pooled is not None
    assert len(predictor.to_predictions(output, truncated)) == 3
    with pytest.raises(ValueError, match="needs the pooled features"):
        predictor.to_predictions(output.logits, truncated)


def test_bundle_without_detector_keeps_the_confidence_rule(tmp_path, classifier):
    loaded = load_bundle(_save(tmp_path, classifier))
    assert loaded.detector is None and "ood" not in loaded.calibration
    predictor = IntentPredictor(loaded)
    assert not predictor.needs_features
    encoding, _ = predictor.encode(TEXTS)
    assert predictor.forward(encoding).pooled is None  # nothing extra computed
    for p in predictor.predict(TEXTS):
        assert p.ood_score == pytest.approx(1 - p.score)
        assert p.out_of_scope == (p.score < 0.2)


def _rewrite_calibration(path: Path, change) -> None:
    calibration = json.loads((path / "calibration.json").read_text())
    change(calibration)
    _rewrite(path, "calibration.json", json.dumps(calibration).encode())


@pytest.mark.parametrize(
    ("damage", "wanted"),
    [
        (
            lambda c: c["ood"].update(num_labels=4),
            "'ood' num_labels is 4, the classifier has 3",
        ),
        (
            lambda c: c["ood"].update(feature_size=7),
            "'ood' feature_size is 7, the classifier pools",
        ),
        (lambda c: c["ood"].update(method="euclid"), "'ood' must name a method among"),
        (lambda c: c.pop("ood"), "ood.safetensors and the 'ood' settings of calibration.json"),
    ],
)
def test_inconsistent_detector_is_refused(tmp_path, classifier, damage, wanted):
    path = _save(tmp_path, classifier, detector=_detector(classifier, "mahalanobis"))
    _rewrite_calibration(path, damage)
    message = _refusal(path)
    assert wanted in message and "\n" not in message


def test_detector_weights_that_do_not_fit_its_settings_are_refused(tmp_path, classifier):
    path = _save(tmp_path, classifier, detector=_detector(classifier, "knn"))
    tensors = load_file(path / "ood.safetensors")
    tensors["bank"] = tensors["bank"][:5]
    save_file(tensors, str(path / "ood.safetensors"))
    _rewrite(path, "ood.safetensors", (path / "ood.safetensors").read_bytes())
    assert "ood.safetensors holds shapes" in _refusal(path)
