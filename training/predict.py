"""Predict intents with a trained bundle from the command line.

    python -m training.predict --bundle runs/demo-intent/bundle "where is my parcel?" "refund me"
    python -m training.predict --bundle DIR --file messages.txt --top_k 3 --json
    cat messages.txt | python -m training.predict --bundle DIR --file -

Scores are temperature-calibrated probabilities; a message whose best score is under
the bundle's out-of-scope threshold is labelled ``out_of_scope`` (its top-k still
lists the closest intents).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from models.bundle import BundleError, load_bundle
from models.predictor import IntentPredictor, Prediction

TASK = "intent-classification"


def read_messages(texts: list[str], file: str | None) -> list[str]:
    """Messages from the arguments, then one per non-empty line of ``file`` (``-``: stdin)."""
    messages = list(texts)
    if file:
        if file == "-":
            lines = sys.stdin.read().splitlines()
        else:
            path = Path(file)
            if not path.is_file():
                raise ValueError(f"--file {file}: no such file")
            lines = path.read_text(encoding="utf-8").splitlines()
        messages += [line for line in lines if line.strip()]
    return messages


def predict_texts(
    bundle_dir: str | Path, texts: list[str], top_k: int = 3, batch_size: int = 64
) -> list[Prediction]:
    """Load ``bundle_dir`` and predict ``texts`` in batches, in order."""
    predictor = IntentPredictor(load_bundle(bundle_dir, task=TASK))
    predictions: list[Prediction] = []
    for start in range(0, len(texts), batch_size):
        predictions += predictor.predict(texts[start : start + batch_size], top_k=top_k)
    return predictions


def format_prediction(text: str, prediction: Prediction) -> str:
    """One human-readable line per message: label, score and the other top-k intents."""
    alternatives = ", ".join(f"{c['label']} {c['score']:.3f}" for c in prediction.top_k)
    return f"{prediction.label}\t{prediction.score:.3f}\t[{alternatives}]\t{text}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="supportlens-predict",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("texts", nargs="*", help="messages to classify")
    parser.add_argument("--bundle", required=True, help="bundle directory (…/bundle)")
    parser.add_argument("--file", help="file with one message per line; '-' reads stdin")
    parser.add_argument("--top_k", type=int, default=3, help="intents listed per message")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--json", action="store_true", help="print JSON lines")
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("--top_k and --batch_size must be at least 1")
    try:
        texts = read_messages(args.texts, args.file)
        if not texts:
            parser.error("no messages: give TEXT arguments or --file")
        predictions = predict_texts(args.bundle, texts, args.top_k, args.batch_size)
    except (BundleError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for text, prediction in zip(texts, predictions, strict=True):
        if args.json:
            print(json.dumps({"text": text, **asdict(prediction)}, ensure_ascii=False))
        else:
            print(format_prediction(text, prediction))
    return 0


if __name__ == "__main__":
    sys.exit(main())
