import hashlib
import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from transformers import BertConfig

from models.backbone import load_backbone
from models.bundle import BundleError, load_bundle, save_bundle, verify_bundle
from models.classifier import ClassifierConfig, IntentClassifier
from models.neighbours import NeighbourVote
from models.predictor import IntentPredictor
from training.neighbours import embed_texts, fit_vote, revise_logits

pytestmark = pytest.mark.unit
LABELS = ["refund", "shipping", "login"]
TEXTS = ["I want my money back", "parcel late", "cannot log in!!", "where is my order"]
TEMPERATURE = 1.5


@pytest.fixture()
def parts(tiny_backbone):
    encoder, tokenizer = load_backbone(str(tiny_backbone))
    config = ClassifierConfig(num_labels=3, special_token_ids=tokenizer.all_special_ids)
    torch.manual_seed(0)
    model = IntentClassifier(config, encoder).eval()
    pretrained, _ = load_backbone(str(tiny_backbone))
    return model, tokenizer, pretrained.eval()


def _vote(pretrained, tokenizer, **settings) -> NeighbourVote:
    """A vote whose bank is the embeddings of TEXTS, labelled 0, 1, 2, 0."""
    vote = NeighbourVote(pretrained.config, 3, len(TEXTS), encoder=pretrained, **settings).eval()
    vote.bank.copy_(embed_texts(vote, tokenizer, TEXTS, 32))
    vote.bank_labels.copy_(torch.tensor([0, 1, 2, 0]))
    return vote


def _save(path, model, tokenizer):
    return save_bundle(
        path,
        model,
        tokenizer,
        task="intent-classification",
        labels=LABELS,
        calibration={"temperature": TEMPERATURE, "oos_threshold": 0.0},
    )


def test_neighbour_vote_weights_neighbours_by_softmax_of_their_similarity():
    config = BertConfig(
        vocab_size=8, hidden_size=2, num_hidden_layers=1, num_attention_heads=1, intermediate_size=4
    )
    vote = NeighbourVote(config, num_labels=3, bank_size=3, k=2, temperature=0.5)
    vote.bank.copy_(F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=-1))
    vote.bank_labels.copy_(torch.tensor([0, 1, 2]))
    query = F.normalize(torch.tensor([[1.0, 0.2]]), dim=-1)
    similarity = (query @ vote.bank.T)[0]  # the nearest two: rows 2 and 0
    weights = torch.softmax(similarity[[2, 0]] / 0.5, dim=-1)
    expected = torch.tensor([[weights[1], 0.0, weights[0]]])
    assert torch.allclose(vote.vote(query), expected, atol=1e-6)


def test_neighbour_vote_revises_only_unsure_rows_and_embeds_only_them(parts):
    _, tokenizer, pretrained = parts
    vote = _vote(pretrained, tokenizer, k=2, weight=0.5, gate=0.8)
    logits = torch.tensor([[9.0, 0.0, 0.0], [0.2, 0.1, 0.0], [0.0, 8.0, 0.0], [0.0, 0.3, 0.4]])
    seen = []

    def embed(rows):
        seen.append(rows.tolist())
        return embed_texts(vote, tokenizer, [TEXTS[i] for i in rows.tolist()], 32)

    revised = vote.revise(logits, TEMPERATURE, embed)
    assert seen == [[1, 3]]  # the confident rows never reach the second encoder
    assert torch.equal(revised[[0, 2]], logits[[0, 2]])
    probs = torch.softmax(logits / TEMPERATURE, dim=-1)
    votes = vote.vote(embed_texts(vote, tokenizer, [TEXTS[1], TEXTS[3]], 32))
    expected = 0.5 * probs[[1, 3]] + 0.5 * votes
    assert torch.allclose(torch.softmax(revised[[1, 3]] / TEMPERATURE, dim=-1), expected, atol=1e-5)
    # Each unsure text is its own nearest bank entry: its label gains weight.
    assert expected[0, 1] > probs[1, 1] and expected[1, 0] > probs[3, 0]


def test_classifier_keeps_its_neighbour_vote_through_save_and_bundle(tmp_path, parts):
    model, tokenizer, pretrained = parts
    vote = _vote(pretrained, tokenizer, k=3, weight=0.3, gate=0.7)
    model.attach_neighbours(vote)
    assert model.config.neighbours == vote.settings()
    path = _save(tmp_path / "bundle", model, tokenizer)
    verify_bundle(path)
    loaded = load_bundle(path).model.neighbours
    assert loaded.settings() == vote.settings()
    assert torch.equal(loaded.bank, vote.bank) and torch.equal(loaded.bank_labels, vote.bank_labels)
    for (name, a), b in zip(
        loaded.encoder.state_dict().items(), pretrained.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    # A bundle without a vote loads without one.
    model.attach_neighbours(None)
    _save(tmp_path / "plain", model, tokenizer)
    assert load_bundle(tmp_path / "plain").model.neighbours is None


def test_predictor_serves_the_vote_for_unsure_rows(tmp_path, parts):
    model, tokenizer, pretrained = parts
    vote = _vote(pretrained, tokenizer, k=2, weight=0.5, gate=2.0)  # every row is unsure
    model.attach_neighbours(vote)
    path = _save(tmp_path / "bundle", model, tokenizer)
    predictor = IntentPredictor(load_bundle(path))
    encoding, _ = predictor.encode(TEXTS)
    served = predictor.probabilities(predictor.forward(encoding).logits)
    with torch.inference_mode():
        plain = torch.softmax(model(**predictor.model_inputs(encoding)).logits / TEMPERATURE, -1)
        votes = vote.vote(embed_texts(vote, tokenizer, TEXTS, 32))
    assert torch.allclose(served, 0.5 * plain + 0.5 * votes, atol=1e-5)
    assert [p.score for p in predictor.predict(TEXTS)] == pytest.approx(
        served.amax(-1).tolist(), abs=1e-5
    )
    predictor.model.neighbours.gate = 0.0  # no row is unsure: the classifier alone
    assert torch.allclose(
        predictor.probabilities(predictor.forward(encoding).logits), plain, atol=1e-6
    )


@pytest.mark.parametrize("packed", [True, False])
def test_predictor_calibrated_scores_the_classifier_without_the_vote(
    tmp_path, parts, packed, monkeypatch
):
    # Faithfulness scores its perturbed texts with `calibrated`: it must measure the
    # classifier that explanations explain, packed or not (a runner other than the
    # PyTorch model, or an encoder that cannot pack, takes forward's path).
    model, tokenizer, pretrained = parts
    model.attach_neighbours(_vote(pretrained, tokenizer, k=2, weight=0.5, gate=2.0))
    predictor = IntentPredictor(
        load_bundle(_save(tmp_path / "bundle", model, tokenizer)), variant_precision="fp32"
    )
    if not packed:
        monkeypatch.setattr("models.predictor.can_pack", lambda encoder: False)
    encoding, _ = predictor.encode(TEXTS)
    with torch.inference_mode():
        plain = torch.softmax(model(**predictor.model_inputs(encoding)).logits / TEMPERATURE, -1)
    assert torch.allclose(predictor.calibrated(TEXTS), plain, atol=1e-5)
    assert not torch.allclose(predictor.probabilities(predictor.forward(encoding).logits), plain)


def test_fit_vote_keeps_none_when_validation_does_not_gain(parts):
    _, tokenizer, pretrained = parts
    labels = np.array([0, 1, 2, 0])
    perfect = np.eye(3)[labels] * 0.9 + 0.1 / 3
    vote, report = fit_vote(
        pretrained, tokenizer, (TEXTS, labels), (TEXTS, labels, perfect), 3, 32, k=1
    )
    assert vote is None and report["kept"] is False and report["weight"] is None
    assert report["validation_macro_f1"] == report["validation_macro_f1_without"] == 1.0


def test_fit_vote_chooses_weight_and_gate_on_validation(parts):
    _, tokenizer, pretrained = parts
    labels = np.array([0, 1, 2, 0])
    # The classifier is unsure and wrong on two validation texts; each is its own nearest
    # training message (k 1), whose label is right.
    probs = np.array([[0.9, 0.05, 0.05], [0.45, 0.4, 0.15], [0.05, 0.05, 0.9], [0.3, 0.4, 0.3]])
    vote, report = fit_vote(
        pretrained, tokenizer, (TEXTS, labels), (TEXTS, labels, probs), 3, 32, k=1
    )
    assert vote is not None and report["kept"]
    assert report["validation_macro_f1"] == 1.0 > report["validation_macro_f1_without"]
    # The lowest gate that reaches both unsure texts (confidence 0.45 and 0.4) wins the tie.
    assert report["gate"] == 0.5 and vote.gate == 0.5
    assert report["validation_unsure_share"] == 0.5
    revised, share = revise_logits(vote, tokenizer, TEXTS, np.log(probs), 1.0, 32)
    assert share == 0.5
    assert (revised.argmax(-1) == labels).all()


def test_bundle_refuses_a_vote_whose_bank_holds_unknown_intents(tmp_path, parts):
    model, tokenizer, pretrained = parts
    vote = _vote(pretrained, tokenizer)
    vote.bank_labels[2] = 7  # 3 intents
    model.attach_neighbours(vote)
    path = _save(tmp_path / "bundle", model, tokenizer)
    with pytest.raises(BundleError, match="neighbour vote: its bank holds labels outside the 3"):
        load_bundle(path)


@pytest.mark.parametrize(
    ("key", "value"), [("k", 0), ("temperature", 0.0), ("weight", 1.5), ("bank_size", 0)]
)
def test_bundle_refuses_unusable_neighbour_settings(tmp_path, parts, key, value):
    model, tokenizer, pretrained = parts
    model.attach_neighbours(_vote(pretrained, tokenizer))
    path = _save(tmp_path / "bundle", model, tokenizer)
    config = json.loads((path / "config.json").read_text())
    config["neighbours"][key] = value
    (path / "config.json").write_text(json.dumps(config))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["config.json"] = hashlib.sha256(
        (path / "config.json").read_bytes()
    ).hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"config\.json does not describe a usable model"):
        verify_bundle(path)
