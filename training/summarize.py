"""Summarize conversations with a trained summarizer bundle; prints one JSON object per conversation.

Usage::

    python -m training.summarize runs/demo-summarizer/bundle "Customer: ...\\nAgent: ..."
    python -m training.summarize BUNDLE --file ticket.txt            # the whole file is one text
    python -m training.summarize BUNDLE --file chats.jsonl --text_column dialogue
    python -m training.summarize BUNDLE --file chats.jsonl --ratio 0.3 --explain attention

Each output line holds ``summary``, ``sentences`` (every unit with its offsets, score
and whether it was selected) and ``explanations``. Problems with the bundle or the
input end with ``error: <message>`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from models.bundle import BundleError, load_bundle
from models.segmentation import segment
from models.summary_predictor import EXPLANATION_METHODS, SummarizationError, SummarizerPredictor

TASK = "extractive-summarization"


class InputError(ValueError):
    """The texts to summarize cannot be read; the message says why."""


def read_texts(path: Path, text_column: str) -> list[str]:
    """A ``.jsonl`` file gives one text per line (field ``text_column``); any other file is one text."""
    if not path.is_file():
        raise InputError(f"{path} does not exist")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text ({exc.reason})") from exc
    if path.suffix.lower() != ".jsonl":
        return [content]
    texts = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict) or not isinstance(row.get(text_column), str):
            raise InputError(f"{path}:{number}: no text field {text_column!r} (set --text_column)")
        texts.append(row[text_column])
    return texts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="summarize", description=__doc__.splitlines()[0])
    parser.add_argument("bundle", help="summarizer bundle directory")
    parser.add_argument("texts", nargs="*", help="conversations or tickets to summarize")
    parser.add_argument("--file", type=Path, help=".jsonl (one per line) or a text file (one text)")
    parser.add_argument("--text_column", default="text", help="field of a .jsonl file")
    parser.add_argument(
        "--max_sentences", type=int, help="units per summary at most (default: the bundle's choice)"
    )
    parser.add_argument("--ratio", type=float, help="share of the units instead of a count")
    parser.add_argument("--explain", nargs="*", default=[], choices=EXPLANATION_METHODS)
    parser.add_argument("--max_length", type=int, help="tokens per encoder chunk")
    parser.add_argument("--batch_size", type=int, default=16)
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; see the module docstring."""
    args = build_parser().parse_args(argv)
    try:
        texts = list(args.texts) + (read_texts(args.file, args.text_column) if args.file else [])
        if not texts:
            raise InputError("nothing to summarize: give texts or --file")
        for number, text in enumerate(texts, start=1):
            if not segment(text):
                raise InputError(f"text {number} is empty: it has no sentence or turn")
        predictor = SummarizerPredictor(
            load_bundle(args.bundle, task=TASK), max_length=args.max_length
        )
        for start in range(0, len(texts), max(1, args.batch_size)):
            results = predictor.summarize(
                texts[start : start + args.batch_size],
                max_sentences=args.max_sentences,
                ratio=args.ratio,
                explain=args.explain,
            )
            for result in results:
                print(
                    json.dumps(
                        {
                            "summary": result.summary,
                            "sentences": result.sentences,
                            "explanations": result.explanations,
                        },
                        ensure_ascii=False,
                    )
                )
    except (BundleError, SummarizationError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
