"""The out-of-scope ceiling study: representations of the same messages, every detector."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.out_of_scope_features import (
    DETECTORS,
    REPRESENTATIONS,
    aggregate,
    detector_name,
    main,
    render_markdown,
    representations,
    score_draw,
)
from models.backbone import load_backbone
from models.classifier import ClassifierConfig, IntentClassifier
from models.tokenization import encode_texts

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


def test_representations_reads_the_classifier_and_the_untouched_backbone(tiny_backbone):
    encoder, tokenizer = load_backbone(str(tiny_backbone))
    pretrained, _ = load_backbone(str(tiny_backbone))
    torch.manual_seed(0)
    model = IntentClassifier(
        ClassifierConfig(num_labels=3, special_token_ids=tokenizer.all_special_ids), encoder
    ).eval()
    with torch.no_grad():  # the classifier's encoder drifts from the backbone, as fine-tuning does
        for parameter in model.encoder.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    texts = ["card not working", "where is my refund for the order", "hi"]
    features = representations(model, pretrained.eval(), tokenizer, texts, 16, batch_size=2)

    assert list(features) == list(REPRESENTATIONS)
    hidden = model.config.hidden_size
    assert all(value.shape[0] == 3 for value in features.values())
    encoding, _ = encode_texts(tokenizer, texts, 16)
    inputs = {k: encoding[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    with torch.no_grad():
        pooled = model(**inputs, output_pooled=True).pooled
        before = (pretrained(**inputs).last_hidden_state * mask).sum(1) / mask.sum(1)
        last = (model.encoder(**inputs).last_hidden_state * mask).sum(1) / mask.sum(1)
    np.testing.assert_allclose(features["pooled"], pooled.numpy(), atol=1e-5)
    np.testing.assert_allclose(features["pretrained (mean)"], before.numpy(), atol=1e-5)
    np.testing.assert_allclose(features["last layer (mean)"], last.numpy(), atol=1e-5)
    assert not np.allclose(features["last layer (mean)"], features["pretrained (mean)"])
    assert features["all layers (mean)"].shape == (3, hidden)
    np.testing.assert_allclose(
        features["pooled + pretrained"],
        np.concatenate([features["pooled"], features["pretrained (mean)"]], axis=1),
    )


def _clusters(rng, centres, per_centre, noise=0.1):
    return np.concatenate([c + noise * rng.standard_normal((per_centre, len(c))) for c in centres])


def test_score_draw_separates_far_messages_and_not_lookalikes():
    rng = np.random.default_rng(0)
    centres = 3.0 * rng.standard_normal((4, 8))
    train = _clusters(rng, centres, 30)
    labels = np.repeat(np.arange(4), 30)
    in_scope = _clusters(rng, centres, 10)
    far = _clusters(rng, [c + 5.0 for c in centres], 10)
    lookalike = _clusters(rng, centres, 10)

    separated = score_draw({"far": train}, labels, {"far": in_scope}, {"far": far}, 4)
    mixed = score_draw({"same": train}, labels, {"same": in_scope}, {"same": lookalike}, 4)

    names = [detector_name(method, k) for method, k in DETECTORS]
    assert list(separated["far"]) == names
    assert all(figures["auroc"] > 99 for figures in separated["far"].values())
    assert all(figures["auroc"] < 80 for figures in mixed["same"].values())


def test_table_reports_every_pair_with_its_spread_and_the_highest():
    def draw(seed, auroc):
        return {
            "seed": seed,
            "detectors": {
                "pooled": {"knn (k=1)": {"auroc": auroc, "fpr_at_95_tpr": 50.0}},
                "pretrained (mean)": {"knn (k=1)": {"auroc": auroc - 5, "fpr_at_95_tpr": 60.0}},
            },
        }

    draws = [draw(1, 90.0), draw(2, 92.0)]
    run = {
        "draws": draws,
        "summary": aggregate(draws),
        "training": "training/recipes/intent/banking77.yaml, 8 epochs",
        "machine": {
            "cpu": "test",
            "cpu_count": 2,
            "torch": "x",
            "python": "3",
            "load_average_at_start": [0.0, 0.0, 0.0],
        },
        "wall_time_s": 60.0,
        "command": "python benchmarks/out_of_scope_features.py",
    }
    assert run["summary"]["pooled"]["knn (k=1)"]["auroc"] == {
        "mean": 91.0,
        "std": 1.41,
        "min": 90.0,
        "max": 92.0,
    }
    table = render_markdown({"runs": {"cpu": run}})
    assert "| pooled | knn (k=1) | 91.00 ± 1.41 | 50.00 ± 0.00 | 90.00, 92.00 |" in table
    assert "Highest mean AUROC: 91.00 (knn (k=1) over pooled)" in table
    assert "highest of any pair on any draw: 92.00" in table


def test_main_refuses_missing_draws_with_one_line(tmp_path, capsys):
    assert main(["--runs_dir", str(tmp_path), "--seeds", "1"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: no trained draw for seeds [1]") and error.count("\n") == 1


def test_load_draw_splits_the_data_as_the_training_run_did(tmp_path, tiny_backbone):
    from benchmarks.out_of_scope_features import load_draw
    from models.bundle import save_bundle
    from training.data import load_intent_data
    from training.recipe import parse_recipe_and_overrides, write_yaml
    from training.run import recipe_config
    from training.train_intent import IntentTask

    demo = REPO / "training" / "demo"
    arguments, _ = parse_recipe_and_overrides(
        IntentTask.argument_types,
        [
            str(REPO / "training/recipes/intent/demo.yaml"),
            *("--train_file", str(demo / "intents.csv")),
            *("--test_file", str(demo / "intents_test.csv")),
            *("--backbone", str(tiny_backbone), "--seed", "7", "--max_length", "24"),
            *("--output_dir", str(tmp_path)),
        ],
    )
    write_yaml(tmp_path / "resolved_config.yaml", recipe_config(*arguments))
    data_args = arguments[0]
    expected = load_intent_data(
        data_args.train_file,
        test_file=data_args.test_file,
        text_column=data_args.text_column,
        label_column=data_args.label_column,
        validation_size=data_args.validation_size,
        seed=7,
    )
    encoder, tokenizer = load_backbone(str(tiny_backbone))
    model = IntentClassifier(ClassifierConfig(num_labels=len(expected.labels)), encoder)
    save = dict(
        task="intent-classification", calibration={"temperature": 1.0, "oos_threshold": 0.1}
    )
    save_bundle(tmp_path / "bundle", model, tokenizer, labels=expected.labels, **save)

    bundle, pretrained, data, (loaded_data, _, loaded_args) = load_draw(tmp_path)
    assert loaded_data.max_length == 24 and loaded_args.seed == 7
    assert not pretrained.training and list(bundle.labels) == expected.labels
    for split in ("train", "validation", "test"):
        assert data.splits[split]["text"] == expected.splits[split]["text"], split

    reordered = [*expected.labels[1:], expected.labels[0]]
    save_bundle(tmp_path / "bundle", model, tokenizer, labels=reordered, **save)
    with pytest.raises(SystemExit, match="the data's intents differ from the bundle's"):
        load_draw(tmp_path)
