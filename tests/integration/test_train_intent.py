"""End to end: fine-tune a tiny random encoder on the demo intents through the CLI entry point."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from datasets import Dataset

from models.bundle import load_bundle
from models.predictor import OUT_OF_SCOPE, IntentPredictor
from training import predict
from training.recipe import parse_recipe_and_overrides
from training.train_intent import (
    DataArguments,
    IntentTrainingArguments,
    ModelArguments,
    main,
    train,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RECIPE = str(REPO / "training" / "recipes" / "intent" / "demo.yaml")
FAST = [
    "--train_file", str(REPO / "training" / "demo" / "intents.csv"),
    "--test_file", str(REPO / "training" / "demo" / "intents_test.csv"),
    "--max_length", "32",
    "--per_device_train_batch_size", "64",
    "--learning_rate", "1e-3",
    "--save_total_limit", "3",
]  # fmt: skip


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_backbone):
    """One epoch on the demo data: a checkpoint, a report and a bundle."""
    output_dir = tmp_path_factory.mktemp("intent-run")
    args = [RECIPE, *FAST, "--backbone", str(tiny_backbone), "--output_dir", str(output_dir)]
    result = train([*args, "--num_train_epochs", "1"])
    return output_dir, args, result


def test_training_writes_bundle_report_and_resolved_config(first_run):
    output_dir, _, result = first_run
    bundle = load_bundle(output_dir / "bundle", task="intent-classification")
    assert len(bundle.labels) >= 12
    assert bundle.training["max_length"] == 32
    assert bundle.calibration["temperature"] > 0
    assert 0.0 <= bundle.calibration["oos_threshold"] <= 1.0
    assert bundle.metrics["accuracy"] == result.report["metrics"]["accuracy"]
    for name in ("report.json", "report.md", "confusion_matrix.png"):
        assert (output_dir / "report" / name).stat().st_size > 0
    resolved = yaml.safe_load((output_dir / "resolved_config.yaml").read_text())
    assert resolved["max_length"] == 32 and resolved["label_column"] == "intent"
    assert json.loads((output_dir / "bundle" / "resolved_config.json").read_text()) == resolved
    assert list(output_dir.glob("checkpoint-*"))
    # The resolved config is itself a valid recipe.
    (data_args, _, args), _ = parse_recipe_and_overrides(
        (DataArguments, ModelArguments, IntentTrainingArguments),
        [str(output_dir / "resolved_config.yaml")],
    )
    assert data_args.max_length == 32 and args.learning_rate == pytest.approx(1e-3)


def test_predictions_identical_after_reload(first_run):
    output_dir, _, result = first_run
    bundle = load_bundle(output_dir / "bundle")
    texts = ["where is my parcel??", "I forgot my password", "Please cancel order 123", "x"]
    encoding = bundle.tokenizer(
        texts, padding=True, truncation=True, max_length=32, return_tensors="pt"
    )
    trained = result.model.eval().cpu()
    with torch.inference_mode():
        before = trained(**encoding).logits
        after = bundle.model(**encoding).logits
    assert torch.equal(before, after)
    predictions = IntentPredictor(bundle).predict(texts, top_k=3)
    assert [len(p.top_k) for p in predictions] == [3] * len(texts)
    for p, row in zip(predictions, after, strict=True):
        best = bundle.labels[int(row.argmax())]
        assert p.top_k[0]["label"] == best
        assert p.label == (OUT_OF_SCOPE if p.out_of_scope else best)


def test_resume_continues_from_last_checkpoint(first_run):
    _, args, first = first_run
    steps_per_epoch = first.report["training"]["global_step"]
    resumed = train([*args, "--num_train_epochs", "2", "--resume"])
    training = resumed.report["training"]
    assert training["resumed_from"].endswith(f"checkpoint-{steps_per_epoch}")
    assert training["global_step"] == 2 * steps_per_epoch


def test_predict_cli_prints_json_lines(first_run, capsys):
    output_dir, _, _ = first_run
    assert (
        predict.main(
            ["--bundle", str(output_dir / "bundle"), "--json", "--top_k", "2", "hi", "refund?"]
        )
        == 0
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["text"] for line in lines] == ["hi", "refund?"]
    assert all(len(line["top_k"]) == 2 for line in lines)


def test_predict_cli_missing_bundle_exits_2(tmp_path, capsys):
    assert predict.main(["--bundle", str(tmp_path / "none"), "hello"]) == 2
    assert "error: no model bundle" in capsys.readouterr().err


def test_bad_data_exits_2_without_bundle(tmp_path, tiny_backbone, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("message,intent\nhello,greet\n")
    output_dir = tmp_path / "run"
    code = main(
        [
            RECIPE,
            "--train_file",
            str(bad),
            "--backbone",
            str(tiny_backbone),
            "--output_dir",
            str(output_dir),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "'text'" in last and "message" in last
    assert not (output_dir / "bundle").exists()


def test_failure_after_training_leaves_no_bundle(tmp_path, tiny_backbone, monkeypatch):
    import training.train_intent as module

    def broken_report(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(module, "write_report", broken_report)
    output_dir = tmp_path / "run"
    with pytest.raises(OSError, match="disk full"):
        train(
            [
                RECIPE,
                *FAST,
                "--backbone",
                str(tiny_backbone),
                "--output_dir",
                str(output_dir),
                "--max_steps",
                "2",
            ]
        )
    assert not (output_dir / "bundle").exists()
    assert not [p for p in output_dir.iterdir() if p.name.startswith(".bundle")]


def test_cli_process_reports_unknown_test_labels_without_traceback(tmp_path, tiny_backbone):
    test = tmp_path / "test.csv"
    test.write_text("text,intent\nwhere is it,track_order\nhello,say_hello\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "training.train_intent", RECIPE, "--test_file", str(test),
         "--backbone", str(tiny_backbone), "--output_dir", str(tmp_path / "run")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert completed.returncode == 2
    assert "error: " in completed.stderr and "say_hello" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_report_states_the_coverage_the_run_used(tmp_path, tiny_backbone):
    output_dir = tmp_path / "run"
    result = train([RECIPE, *FAST, "--backbone", str(tiny_backbone), "--output_dir",
                    str(output_dir), "--max_steps", "2", "--oos_coverage", "0.9"])  # fmt: skip
    report = (output_dir / "report" / "report.md").read_text()
    assert "keeps at least 90% of the correctly classified validation messages" in report
    assert "99%" not in report
    assert result.report["metrics"]["oos_coverage"] == 0.9
    assert result.report["training"]["oos_coverage"] == 0.9


def test_resume_from_checkpoint_is_honoured(first_run, tmp_path):
    output_dir, args, first = first_run
    checkpoint = output_dir / f"checkpoint-{first.report['training']['global_step']}"
    args = [a if a != str(output_dir) else str(tmp_path / "run") for a in args]
    result = train([*args, "--num_train_epochs", "1", "--resume_from_checkpoint", str(checkpoint)])
    assert result.report["training"]["resumed_from"] == str(checkpoint)
    assert result.report["training"]["global_step"] == first.report["training"]["global_step"]


def test_distillation_trains_on_the_logits_of_a_wider_teacher(first_run, tmp_path, monkeypatch):
    from models.classifier import IntentClassifier
    from tests.conftest import make_tiny_backbone
    from training.train_intent import teacher_logits

    _, args, _ = first_run
    wide = make_tiny_backbone(tmp_path / "wide-bert", seed=3, hidden_size=48)
    teacher_dir = tmp_path / "teacher"
    train([*args, "--num_train_epochs", "1", "--output_dir", str(teacher_dir),
           "--backbone", str(wide)])  # fmt: skip
    teacher = load_bundle(teacher_dir / "bundle")
    assert teacher.model.config.hidden_size == 48
    texts = ["where is my parcel", "reset my password", "I want a refund"]
    split = {"seed": teacher.training["seed"]}
    logits = teacher_logits(str(teacher_dir / "bundle"), texts, teacher.labels, split, 32, 2)
    batch = teacher.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        expected = teacher.model(**batch).logits
    assert logits.shape == (3, len(teacher.labels))
    assert np.allclose(logits, expected.numpy(), atol=1e-5)

    seen = []
    original = IntentClassifier.distillation_loss
    monkeypatch.setattr(
        IntentClassifier,
        "distillation_loss",
        lambda self, loss, logits, teacher: (
            seen.append(teacher) or original(self, loss, logits, teacher)
        ),
    )
    output_dir = tmp_path / "student"
    train([*args, "--num_train_epochs", "1", "--output_dir", str(output_dir),
           "--teacher", str(teacher_dir / "bundle"), "--distillation_alpha", "0.7"])  # fmt: skip
    student = load_bundle(output_dir / "bundle")
    assert student.model.config.hidden_size == 32  # the student keeps its own backbone
    assert seen and all(t.shape[-1] == len(teacher.labels) for t in seen)
    assert student.training["teacher"] == str(teacher_dir / "bundle")
    assert student.model.config.distillation_alpha == 0.7


def test_distillation_refuses_a_teacher_of_another_split_or_intents(first_run, tmp_path, capsys):
    teacher_dir, args, _ = first_run
    student = [*args, "--output_dir", str(tmp_path / "student"), "--teacher",
               str(teacher_dir / "bundle")]  # fmt: skip
    assert main([*student, "--seed", "7"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: teacher") and "another split (seed differ)" in last
    assert main([*student, "--validation_size", "0.3"]) == 2
    assert "another split (validation_size differ)" in capsys.readouterr().err
    assert main([*student, "--distillation_alpha", "1.5"]) == 2
    assert "error: distillation_alpha must be in [0, 1], got 1.5" in capsys.readouterr().err
    assert main([*student, "--distillation_temperature", "0"]) == 2
    assert "error: distillation_temperature must be positive, got 0.0" in capsys.readouterr().err
    demo = REPO / "training" / "demo"
    _relabel(demo / "intents.csv", tmp_path / "train.csv", "track_order", "where_is_it")
    _relabel(demo / "intents_test.csv", tmp_path / "test.csv", "track_order", "where_is_it")
    renamed = [
        "--train_file",
        str(tmp_path / "train.csv"),
        "--test_file",
        str(tmp_path / "test.csv"),
    ]
    assert main([*student, *renamed]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "its intents differ" in last
    assert main([*student, "--teacher", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: teacher: ")
    assert not (tmp_path / "student" / "bundle").exists()


def _relabel(source: Path, target: Path, intent: str, label: str) -> int:
    """Copy a demo CSV with one intent's rows relabelled; return how many were."""
    with open(source, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    count = 0
    for row in rows:
        if row["intent"] == intent:
            row["intent"], count = label, count + 1
    with open(target, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "intent"])
        writer.writeheader()
        writer.writerows(rows)
    return count


def test_oos_label_rows_choose_the_detector_and_never_become_a_class(tmp_path, tiny_backbone):
    demo = REPO / "training" / "demo"
    n_train = _relabel(demo / "intents.csv", tmp_path / "train.csv", "track_order", "none")
    n_test = _relabel(demo / "intents_test.csv", tmp_path / "test.csv", "track_order", "none")
    assert n_train > 5 and n_test > 0
    output_dir = tmp_path / "run"
    result = train([RECIPE, *FAST, "--backbone", str(tiny_backbone), "--output_dir",
                    str(output_dir), "--num_train_epochs", "1", "--oos_label", "none",
                    "--train_file", str(tmp_path / "train.csv"),
                    "--test_file", str(tmp_path / "test.csv")])  # fmt: skip
    bundle = load_bundle(output_dir / "bundle")
    assert "none" not in bundle.labels and "track_order" not in bundle.labels
    oos = result.report["metrics"]["out_of_scope"]
    assert oos["n_validation_oos"] == n_train and oos["n_test_oos"] == n_test
    # The out-of-scope validation messages chose the detector (best AUROC) and its threshold.
    assert oos["rule"] == "best validation accuracy with out-of-scope examples"
    assert oos["method"] == max(oos["validation"], key=lambda m: oos["validation"][m]["auroc"])
    assert bundle.detector.method == oos["method"] == bundle.calibration["ood"]["method"]
    assert float(bundle.detector.threshold) == pytest.approx(oos["threshold"])
    for row in oos["detectors"].values():  # every detector measured on the test OOS set
        assert 0 <= row["auroc"] <= 1 and 0 <= row["oos_recall"] <= 1
    assert "## Out-of-scope detection" in (output_dir / "report" / "report.md").read_text()
    predictions = IntentPredictor(bundle).predict(["where is my parcel", "reset my password"])
    assert all(isinstance(p.ood_score, float) for p in predictions)


def test_without_oos_data_the_report_shows_what_the_rule_costs(first_run):
    output_dir, _, result = first_run
    oos = result.report["metrics"]["out_of_scope"]
    assert oos["n_validation_oos"] == 0 and oos["rule"].startswith("keeps 99%")
    assert oos["method"] == "relative_mahalanobis"  # the default without out-of-scope examples
    for row in oos["detectors"].values():
        assert row["oos_recall"] is None and "auroc" not in row
        assert row["in_scope_accuracy_with_rule"] <= row["in_scope_accuracy"]
    bundle = load_bundle(output_dir / "bundle")
    assert bundle.calibration["ood"]["method"] == "relative_mahalanobis"
    assert "in-scope flagged" in (output_dir / "report" / "report.md").read_text()


def test_features_and_logits_come_in_dataset_order_with_length_grouping(tmp_path, tiny_backbone):
    # Trainer's evaluation loader shuffles by length under group_by_length; the labels the
    # detectors and the report read are in dataset order, so the outputs must be too.
    from transformers import Trainer, TrainingArguments

    from models.backbone import load_backbone
    from models.classifier import ClassifierConfig, IntentClassifier
    from training.train_intent import logits_and_features

    encoder, tokenizer = load_backbone(str(tiny_backbone))
    model = IntentClassifier(ClassifierConfig(num_labels=2), encoder).eval()
    texts = ["a", "a b c d e f g h", "a b", "a b c d e f g h i j k l", "a b c"] * 3
    dataset = Dataset.from_dict({"text": texts, "label": [0, 1, 0, 1, 0] * 3}).map(
        lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"]
    )
    args = TrainingArguments(str(tmp_path), per_device_eval_batch_size=4, report_to=[],
                             train_sampling_strategy="group_by_length", use_cpu=True)  # fmt: skip
    trainer = Trainer(model=model, args=args, processing_class=tokenizer)
    logits, features = logits_and_features(trainer, dataset)
    with torch.inference_mode():
        for i, text in enumerate(texts):
            output = model(**tokenizer([text], return_tensors="pt"), output_pooled=True)
            torch.testing.assert_close(torch.from_numpy(logits[i]), output.logits[0])
            torch.testing.assert_close(torch.from_numpy(features[i]), output.pooled[0])


def test_neighbour_vote_is_fitted_on_validation_and_served_as_evaluated(tmp_path, tiny_backbone):
    output_dir = tmp_path / "run"
    result = train([RECIPE, *FAST, "--backbone", str(tiny_backbone), "--output_dir",
                    str(output_dir), "--max_steps", "3", "--neighbours", "true"])  # fmt: skip
    report = result.report["metrics"]["neighbours"]
    # Three steps leave the classifier unsure everywhere: the vote must beat it on validation.
    assert report["kept"] and report["gate"] is not None
    assert report["validation_macro_f1"] > report["validation_macro_f1_without"]
    assert 0.0 < report["unsure_share"]["test"] <= 1.0
    bundle = load_bundle(output_dir / "bundle")
    vote = bundle.model.neighbours
    assert vote is not None and (vote.weight, vote.gate) == (report["weight"], report["gate"])
    assert vote.bank.shape[0] == result.report["training"]["data"]["examples"]["train"]
    # The test figures of the report are those of the bundle as served.
    with open(REPO / "training" / "demo" / "intents_test.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    predictions = IntentPredictor(bundle).predict([r["text"] for r in rows], top_k=1)
    served = [p.top_k[0]["label"] == r["intent"] for p, r in zip(predictions, rows, strict=True)]
    assert np.mean(served) == pytest.approx(result.report["metrics"]["accuracy"])


def test_neighbour_settings_out_of_range_exit_2_before_training(tmp_path, tiny_backbone, capsys):
    args = [RECIPE, *FAST, "--backbone", str(tiny_backbone), "--output_dir", str(tmp_path / "r"),
            "--neighbours", "true"]  # fmt: skip
    assert main([*args, "--neighbour_k", "0"]) == 2
    assert "error: neighbour_k must be at least 1, got 0" in capsys.readouterr().err
    assert main([*args, "--neighbour_temperature", "-1"]) == 2
    assert "error: neighbour_temperature must be positive, got -1.0" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
