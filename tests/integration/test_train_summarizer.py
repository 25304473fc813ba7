"""Real training runs of the summarizer on the demo conversations (tiny encoder), resume, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from models.backbone import load_backbone
from models.bundle import load_bundle
from models.segmentation import segment
from models.summary_predictor import SummarizerPredictor
from training import summarize, train_summarizer

pytestmark = pytest.mark.integration

RECIPE = "training/recipes/summarizer/demo.yaml"
RECIPE_DATA = "training/demo/conversations.jsonl"
CONVERSATION = "Customer: My parcel is late.\nAgent: I will reship it today.\nCustomer: Thanks!"


def tiny_args(backbone, output_dir, *extra):
    return [
        RECIPE,
        "--backbone", str(backbone),
        "--output_dir", str(output_dir),
        "--max_length", "64",
        "--chunk_overlap", "16",
        "--context_feedforward", "64",
        "--per_device_train_batch_size", "8",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tiny_backbone, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("summarizer-run")
    result = train_summarizer.train(
        tiny_args(tiny_backbone, output_dir, "--num_train_epochs", "1", "--test_file", RECIPE_DATA)
    )
    return output_dir, result


def test_training_writes_a_loadable_bundle_with_rouge_figures(trained):
    output_dir, result = trained
    bundle = load_bundle(result.bundle, task="extractive-summarization")
    assert bundle.training["max_length"] == 64
    metrics = bundle.metrics
    assert metrics["split"] == "test" and metrics["conversations"] == 40
    for system in ("model", "lead3", "oracle"):
        assert 0 < metrics[system]["rouge1"] <= 100
    # The oracle is chosen against the references, so nothing beats it on ROUGE-1+2.
    oracle = metrics["oracle"]["rouge1"] + metrics["oracle"]["rouge2"]
    assert oracle >= metrics["lead3"]["rouge1"] + metrics["lead3"]["rouge2"]
    assert (output_dir / "resolved_config.yaml").is_file()
    assert json.loads((output_dir / "report.json").read_text())["metrics"] == metrics
    [summary] = SummarizerPredictor(bundle).summarize([CONVERSATION], max_sentences=1)
    assert sum(s["selected"] for s in summary.sentences) == 1


def test_resume_continues_from_the_last_checkpoint(trained, tiny_backbone):
    output_dir, first = trained
    steps = first.report["training"]["global_step"]
    result = train_summarizer.train(
        tiny_args(tiny_backbone, output_dir, "--num_train_epochs", "2", "--resume", "true")
    )
    assert result.report["training"]["resumed_from"]
    assert result.report["training"]["global_step"] == 2 * steps


def test_summarize_cli_prints_one_json_line_per_text(trained, tmp_path, capsys):
    _, result = trained
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"dialogue": CONVERSATION}) + "\n")
    code = summarize.main(
        [str(result.bundle), "Один. Два. Три.", "--file", str(chats), "--text_column", "dialogue",
         "--explain", "attention"]
    )  # fmt: skip
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2
    assert lines[1]["summary"] and len(lines[1]["sentences"]) == 3
    assert "attention" in lines[1]["explanations"]


@pytest.mark.parametrize(
    ("args", "message"),
    [(["   "], "text 1 is empty"), (["--file", "missing.jsonl"], "does not exist")],
)
def test_summarize_cli_bad_input_is_a_clear_error(trained, capsys, args, message):
    _, result = trained
    assert summarize.main([str(result.bundle), *args]) == 2
    assert message in capsys.readouterr().err


def test_training_bad_data_exits_with_a_message(tiny_backbone, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"text": "Customer: hi\nAgent: hello"}) + "\n")
    code = train_summarizer.main(
        tiny_args(tiny_backbone, tmp_path / "out", "--train_file", str(data))
    )
    assert code == 2
    assert "needs a reference summary column" in capsys.readouterr().err


def test_training_with_graded_targets_listwise_loss_and_frozen_encoder(tiny_backbone, tmp_path):
    result = train_summarizer.train(
        tiny_args(
            tiny_backbone, tmp_path / "run", "--num_train_epochs", "1",
            "--targets", "rouge", "--loss", "listwise", "--position_features", "true",
            "--freeze_encoder_layers", "-1", "--units", "sentences",
        )
    )  # fmt: skip
    training = result.report["training"]
    assert training["targets"] == "rouge" and training["frozen_encoder_layers"] == 2
    assert training["units"] == "sentences"
    bundle = load_bundle(result.bundle, task="extractive-summarization")
    assert bundle.model.config.loss == "listwise" and bundle.model.config.position_features
    # Frozen means untouched: the saved encoder equals the backbone it started from.
    start = load_backbone(str(tiny_backbone))[0].state_dict()
    for name, value in bundle.model.encoder.state_dict().items():
        torch.testing.assert_close(value, start[name])
    [summary] = SummarizerPredictor(bundle).summarize([CONVERSATION], max_sentences=2)
    assert sum(s["selected"] for s in summary.sentences) == 2
    # The bundle's units are the ones inference segments into: sentences within turns.
    text = "Customer: Hi. My parcel is late.\nAgent: Sorry! I will reship it today."
    [split] = SummarizerPredictor(bundle).summarize([text])
    assert [s["text"] for s in split.sentences] == [u.text for u in segment(text, "sentences")]
    assert len(split.sentences) == 4


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--targets", "best", "targets must be one of"),
        ("--loss", "hinge", "unknown summarizer loss"),
        ("--units", "paragraphs", "units must be one of"),
    ],
)
def test_training_rejects_unknown_targets_and_losses(
    tiny_backbone, tmp_path, capsys, option, value, message
):
    code = train_summarizer.main(tiny_args(tiny_backbone, tmp_path / "out", option, value))
    assert code == 2
    assert message in capsys.readouterr().err
