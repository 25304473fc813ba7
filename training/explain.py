"""Explain intent predictions of a trained classifier bundle.

    python -m training.explain --bundle runs/banking77/bundle "I lost my card"
    python -m training.explain --bundle DIR --method attention --method occlusion \\
        --html explanations.html "where is my refund?" "card got declined"

Prints, per text, the predicted intent and, per method, the words ranked by their
raw score (with the normalised score in brackets). ``--json`` prints one JSON
object per text instead; ``--html FILE`` also writes a page with highlighted words.
Texts come from the arguments, or one per line from standard input. ``--target
contrast`` explains the top intent against the runner-up (the logit difference);
``--faithfulness`` measures each explanation on its own text (comprehensiveness and
sufficiency of the calibrated probability, as the service and the benchmark do).
"""

from __future__ import annotations

import argparse
import html
import json
import sys
from pathlib import Path

from models.bundle import BundleError, load_bundle
from models.explanations import METHODS, ExplanationError, normalize
from models.files import atomic_write_text
from models.highlight import render_html
from models.predictor import IntentPredictor

DEFAULT_METHODS = ("attention", "integrated_gradients")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="supportlens-explain", description="Explain intent predictions word by word."
    )
    parser.add_argument("--bundle", required=True, help="intent classifier bundle directory")
    parser.add_argument(
        "--method",
        action="append",
        choices=METHODS,
        help=f"explanation method, repeatable (default: {' and '.join(DEFAULT_METHODS)})",
    )
    parser.add_argument(
        "--target",
        help="intent label to explain instead of the predicted one (for every text), or "
        "'contrast' for the top intent against the runner-up",
    )
    parser.add_argument(
        "--faithfulness",
        action="store_true",
        help="measure each explanation on its text (comprehensiveness, sufficiency)",
    )
    parser.add_argument("--ig-steps", type=int, default=32, help="integrated-gradients steps")
    parser.add_argument("--top", type=int, default=5, help="words listed per method")
    parser.add_argument("--json", action="store_true", help="print one JSON object per text")
    parser.add_argument("--html", type=Path, help="also write an HTML page with highlights")
    parser.add_argument("texts", nargs="*", metavar="TEXT", help="messages (default: stdin)")
    args = parser.parse_args(argv)
    if args.ig_steps < 1:
        parser.error("--ig-steps must be at least 1")
    if not args.texts:
        args.texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not args.texts:
        parser.error("no text to explain: pass messages as arguments or on standard input")
    args.method = list(dict.fromkeys(args.method or DEFAULT_METHODS))
    return args


def write_html(path: Path, texts: list[str], rows: list[dict], labels: list[str]) -> None:
    """Write a standalone page with one highlighted fragment per text and method (atomically)."""
    sections = []
    for text, row in zip(texts, rows, strict=True):
        items = "".join(
            f"<li><b>{html.escape(method)}</b>: "
            f"{render_html(text, explanation.words, label=method)}</li>"
            for method, explanation in row.items()
        )
        target = labels[next(iter(row.values())).target]
        sections.append(f"<section><h2>{html.escape(target)}</h2><ul>{items}</ul></section>")
    page = (
        '<!doctype html><html><head><meta charset="utf-8"><title>Explanations</title>'
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        "mark{border-radius:3px;padding:0 1px}li{margin:.4em 0}</style></head><body>"
        + "".join(sections)
        + "</body></html>\n"
    )
    atomic_write_text(path, page)


def main(argv: list[str] | None = None) -> int:
    """Load the bundle, explain the texts, print (and optionally write HTML)."""
    args = parse_args(argv)
    try:
        bundle = load_bundle(args.bundle, task="intent-classification")
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    labels = bundle.labels
    targets = versus = None
    predictor = IntentPredictor(bundle)
    # With a neighbour vote the served prediction may differ from the classifier's own:
    # the predicted intent explained is the served one, as in the HTTP API.
    if args.target == "contrast" or (args.target is None and predictor.has_neighbour_vote):
        encoding, _ = predictor.encode(args.texts)
        top = predictor.forward(encoding).logits.topk(2, dim=-1).indices.tolist()  # (B, 2)
        targets = [row[0] for row in top]
        versus = [row[1] for row in top] if args.target == "contrast" else None
    elif args.target is not None:
        if args.target not in labels:
            print(
                f"error: unknown intent {args.target!r}; the bundle knows {labels}", file=sys.stderr
            )
            return 2
        targets = [labels.index(args.target)] * len(args.texts)
    explainer = predictor.explainer(ig_steps=args.ig_steps)

    def calibrated(texts: list[str]):
        # The classifier alone (no neighbour vote): faithfulness measures what is explained.
        encoding, _ = predictor.encode(texts)
        return predictor.probabilities(predictor.forward(encoding, neighbour_vote=False).logits)

    try:
        rows = explainer.explain(args.texts, args.method, targets, versus)
        if args.faithfulness:
            explainer.faithfulness(args.texts, rows, calibrated)
    except ExplanationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    for text, row in zip(args.texts, rows, strict=True):
        target = labels[next(iter(row.values())).target]
        if args.json:
            document = {
                "text": text,
                "target": target,
                "explanations": {m: e.to_dict() for m, e in row.items()},
            }
            print(json.dumps(document, ensure_ascii=False))
            continue
        other = next(iter(row.values())).versus
        print(f"{text}\n  intent: {target}" + (f" rather than {labels[other]}" if other else ""))
        for method, explanation in row.items():
            ranked = sorted(
                zip(explanation.words, normalize(explanation.words), strict=True),
                key=lambda pair: pair[0].score,
                reverse=True,
            )[: args.top]
            shown = "  ".join(f"{w.text} {w.score:+.4f} ({n:+.2f})" for w, n in ranked)
            delta = f"  [delta {explanation.delta:+.2e}]" if explanation.delta is not None else ""
            print(f"  {method}: {shown}{delta}")
            if explanation.faithfulness is not None:
                print(
                    f"    faithfulness: comprehensiveness "
                    f"{explanation.faithfulness.comprehensiveness:+.3f}, sufficiency "
                    f"{explanation.faithfulness.sufficiency:+.3f}"
                )
    if args.html:
        write_html(args.html, args.texts, rows, labels)
        print(f"wrote {args.html}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
