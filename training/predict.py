"""Predict intents with a trained bundle: a few messages, or a whole ticket archive.

    python -m training.predict --bundle runs/demo-intent/bundle "where is my parcel?" "refund me"
    python -m training.predict --bundle DIR --file messages.txt --top_k 3 --json
    cat messages.txt | python -m training.predict --bundle DIR --file -

Batch scoring (``supportlens-predict``): read a CSV / JSONL / Parquet archive, write
Parquet or JSONL with one row per input row (``row``, the kept columns, ``intent``,
``confidence``, ``out_of_scope``, ``top_k``, ``truncated``, optionally ``explanations``):

    supportlens-predict --bundle DIR --input tickets.csv --text_column body \\
        --output scored.parquet --keep_columns ticket_id --plot intents.png
    supportlens-predict --bundle DIR --input tickets.parquet --output scored.parquet --shard 2/8
    supportlens-predict --plot intents.png --scored scored-shard-*.parquet

Scoring writes chunks of ``--chunk_size`` rows, each atomically, into ``<output>.parts/``;
a run that is stopped (killed, evicted) and started again with the same arguments
resumes after the last complete chunk, and the chunks become ``<output>`` (renamed into
place) when every row is scored. ``--shard i/N`` scores the rows whose index modulo N is
i and writes ``<stem>-shard-0000i-of-0000N<suffix>``, so N processes (a Kubernetes
Indexed Job) can share an archive.

Scores are temperature-calibrated probabilities; a message whose best score is under
the bundle's out-of-scope threshold is labelled ``out_of_scope`` (its top-k still
lists the closest intents). Empty texts are kept with null predictions.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from models.bundle import BundleError, load_bundle
from models.files import atomic_path, atomic_write_json
from models.predictor import OUT_OF_SCOPE, IntentPredictor, Prediction

TASK = "intent-classification"
INPUT_FORMATS = (".csv", ".jsonl", ".json", ".parquet")
OUTPUT_FORMATS = (".parquet", ".jsonl")
META = "meta.json"
logger = logging.getLogger("training.predict")


class BatchError(ValueError):
    """Bad input, output or arguments for batch scoring; the message names the problem."""


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


# -- reading archives --------------------------------------------------------------------


def parse_shard(value: str) -> tuple[int, int]:
    """``"i/N"`` -> ``(i, N)`` with ``0 <= i < N``."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", value or "")
    if not match:
        raise BatchError(f"--shard must look like i/N (e.g. 0/4), got {value!r}")
    index, count = int(match[1]), int(match[2])
    if count < 1 or index >= count:
        raise BatchError(f"--shard {value}: need 0 <= i < N")
    return index, count


def _input_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in INPUT_FORMATS:
        raise BatchError(
            f"--input {path}: unknown file type {suffix or '(none)'!r}; use one of {list(INPUT_FORMATS)}"
        )
    if not path.is_file():
        raise BatchError(f"--input {path}: no such file")
    return "jsonl" if suffix == ".json" else suffix[1:]


def _missing(path: Path, wanted: list[str], present: list[str]) -> None:
    missing = [c for c in wanted if c not in present]
    if missing:
        raise BatchError(f"--input {path}: no column {missing[0]!r} (columns: {present})")


def read_columns(path: Path, columns: list[str], batch_rows: int = 4096) -> Iterator[dict]:
    """Stream ``columns`` of a CSV / JSONL / Parquet file as ``{column: [values]}`` batches.

    Every requested column is read as text (CSV, JSONL) so ids such as ``007`` survive.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    kind = _input_format(path)
    try:
        if kind == "parquet":
            file = pq.ParquetFile(path)
            _missing(path, columns, file.schema_arrow.names)
            for batch in file.iter_batches(batch_size=batch_rows, columns=columns):
                yield batch.to_pydict()
        elif kind == "csv":
            with pacsv.open_csv(path) as probe:
                _missing(path, columns, probe.schema.names)
            convert = pacsv.ConvertOptions(
                include_columns=columns, column_types=dict.fromkeys(columns, pa.string())
            )
            with pacsv.open_csv(path, convert_options=convert) as reader:
                for batch in reader:
                    yield batch.to_pydict()
        else:
            yield from _read_jsonl(path, columns, batch_rows)
    except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:
        raise BatchError(f"--input {path}: cannot read it ({str(exc).splitlines()[0]})") from exc


def _read_jsonl(path: Path, columns: list[str], batch_rows: int) -> Iterator[dict]:
    batch: dict[str, list] = {c: [] for c in columns}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BatchError(f"--input {path}: line {number} is not JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise BatchError(f"--input {path}: line {number} is not a JSON object")
            _missing(path, columns, list(record))
            for column in columns:
                value = record[column]
                batch[column].append(
                    value if value is None or isinstance(value, str) else str(value)
                )
            if len(batch[columns[0]]) >= batch_rows:
                yield batch
                batch = {c: [] for c in columns}
    if batch[columns[0]]:
        yield batch


def count_rows(path: Path, column: str) -> int:
    """Rows in the archive (Parquet: from its metadata; otherwise one cheap pass)."""
    if _input_format(path) == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    return sum(len(batch[column]) for batch in read_columns(path, [column]))


def shard_rows(
    path: Path, columns: list[str], shard: tuple[int, int], skip: int = 0
) -> Iterator[tuple[int, dict]]:
    """``(row index, record)`` of this shard's rows, after the first ``skip`` of them."""
    index, count = shard
    row = seen = 0
    for batch in read_columns(path, columns):
        size = len(batch[columns[0]])
        for offset in range(size):
            if (row + offset) % count == index:
                if seen >= skip:
                    yield row + offset, {c: batch[c][offset] for c in columns}
                seen += 1
        row += size


# -- writing scored chunks ----------------------------------------------------------------


def shard_output(output: Path, shard: tuple[int, int]) -> Path:
    """Where shard ``i`` of ``N`` writes (the output itself when there is one shard)."""
    index, count = shard
    if count == 1:
        return output
    return output.with_name(f"{output.stem}-shard-{index:05d}-of-{count:05d}{output.suffix}")


def _schema(keep_columns: list[str], explain: bool):
    import pyarrow as pa

    candidate = pa.struct([("label", pa.string()), ("score", pa.float64())])
    fields = [("row", pa.int64())] + [(c, pa.string()) for c in keep_columns]
    fields += [
        ("intent", pa.string()),
        ("confidence", pa.float64()),
        ("out_of_scope", pa.bool_()),
        ("top_k", pa.list_(candidate)),
        ("truncated", pa.bool_()),
    ]
    if explain:
        fields.append(("explanations", pa.string()))  # JSON: {method: {words: [...]}}
    return pa.schema(fields)


def _atomic_parquet(table, path: Path) -> None:
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def completed_rows(parts: Path) -> int:
    """The resume offset: rows covered by the contiguous complete chunks in ``parts``."""
    import pyarrow.parquet as pq

    done = 0
    for part in sorted(parts.glob("part-*.parquet")):
        start = int(part.stem.split("-")[1])
        if start != done:
            raise BatchError(
                f"{parts}: chunk {part.name} does not follow row {done}; remove {parts}"
            )
        done += pq.ParquetFile(part).metadata.num_rows
    return done


def assemble(parts: Path, output: Path) -> int:
    """Join the chunks into ``output`` (Parquet or JSONL), atomically; returns the row count."""
    import pyarrow.parquet as pq

    chunks = sorted(parts.glob("part-*.parquet"))
    rows = 0
    with atomic_path(output) as tmp:
        if output.suffix.lower() == ".parquet":
            schema = pq.read_schema(chunks[0]) if chunks else None
            with pq.ParquetWriter(tmp, schema) as writer:
                for chunk in chunks:
                    table = pq.read_table(chunk)
                    writer.write_table(table)
                    rows += table.num_rows
        else:
            with open(tmp, "w", encoding="utf-8") as handle:
                for chunk in chunks:
                    for record in pq.read_table(chunk).to_pylist():
                        if "explanations" in record and record["explanations"] is not None:
                            record["explanations"] = json.loads(record["explanations"])
                        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                        rows += 1
    return rows


@dataclass
class ScoreJob:
    """One batch-scoring run: what to read, how to score, where to write."""

    bundle: str
    input: Path
    output: Path
    text_column: str = "text"
    keep_columns: tuple[str, ...] = ()
    shard: tuple[int, int] = (0, 1)
    top_k: int = 3
    batch_size: int = 64
    chunk_size: int = 2048
    explain: tuple[str, ...] = ()
    device: str = "cpu"
    overwrite: bool = False
    progress: bool = True


def _identity(job: ScoreJob, bundle_version: str) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the chunks."""
    stat = job.input.stat()
    return {
        "input": str(job.input.resolve()),
        "input_bytes": stat.st_size,
        "input_mtime_ns": stat.st_mtime_ns,
        "text_column": job.text_column,
        "keep_columns": list(job.keep_columns),
        "shard": list(job.shard),
        "top_k": job.top_k,
        "chunk_size": job.chunk_size,
        "explain": list(job.explain),
        "bundle_version": bundle_version,
    }


def _as_text(value: Any) -> str | None:
    return value if value is None or isinstance(value, str) else str(value)


def _explain_rows(explainer, texts: list[str], methods: tuple[str, ...]) -> list[str]:
    rows = explainer.explain(texts, list(methods), None)
    return [
        json.dumps({m: e.to_dict() for m, e in row.items()}, ensure_ascii=False) for row in rows
    ]


def score_archive(job: ScoreJob) -> Path:
    """Score ``job.input`` into ``job.output`` (this shard's file), resuming if possible."""
    import pyarrow as pa
    from tqdm import tqdm

    if job.output.suffix.lower() not in OUTPUT_FORMATS:
        raise BatchError(f"--output {job.output}: use a .parquet or .jsonl file name")
    columns = list(dict.fromkeys([job.text_column, *job.keep_columns]))
    taken = set(_schema([], explain=True).names) & set(job.keep_columns)
    if taken:
        raise BatchError(
            f"--keep_columns: {sorted(taken)} would clash with the output columns of the same name"
        )
    _input_format(job.input)
    output = shard_output(job.output, job.shard)
    parts = output.with_name(output.name + ".parts")
    if output.exists() and not job.overwrite:
        logger.info("%s is complete already (pass --overwrite to score again)", output)
        return output
    if job.overwrite:
        shutil.rmtree(parts, ignore_errors=True)

    bundle = load_bundle(job.bundle, task=TASK, device=job.device)
    predictor = IntentPredictor(bundle)
    explainer = None
    if job.explain:
        from models.explanations import METHODS, Explainer

        unknown = sorted(set(job.explain) - set(METHODS))
        if unknown:
            raise BatchError(f"--explain: unknown method(s) {unknown}; choose from {list(METHODS)}")
        explainer = Explainer(bundle.model, bundle.tokenizer, max_length=predictor.max_length)

    identity = _identity(job, bundle.version)
    parts.mkdir(parents=True, exist_ok=True)
    for stale in parts.glob(".*.tmp-*"):
        stale.unlink()
    meta = parts / META
    if meta.is_file():
        previous = json.loads(meta.read_text())
        if previous != identity:
            changed = sorted(k for k in identity if previous.get(k) != identity[k])
            raise BatchError(
                f"{parts} holds chunks of a different run (changed: {', '.join(changed)}); "
                "remove it or pass --overwrite"
            )
    else:
        atomic_write_json(meta, identity)
    done = completed_rows(parts)
    if done:
        logger.info("resuming at row %d of shard %d/%d", done, *job.shard)

    index, count = job.shard
    total_rows = count_rows(job.input, job.text_column)
    shard_total = len(range(index, total_rows, count))
    schema = _schema(list(job.keep_columns), bool(explainer))
    bar = tqdm(
        total=shard_total,
        initial=done,
        unit="msg",
        desc=output.name,
        disable=not job.progress,
        mininterval=1.0 if sys.stderr.isatty() else 30.0,
    )

    def flush(rows: list[int], records: list[dict]) -> None:
        nonlocal done
        texts = [r[job.text_column] for r in records]
        scored = [i for i, t in enumerate(texts) if isinstance(t, str) and t.strip()]
        predictions: dict[int, Prediction] = {}
        explanations: dict[int, str] = {}
        for start in range(0, len(scored), job.batch_size):
            batch = scored[start : start + job.batch_size]
            batch_texts = [texts[i] for i in batch]
            predictions.update(zip(batch, predictor.predict(batch_texts, job.top_k), strict=True))
            if explainer is not None:
                explanations.update(
                    zip(batch, _explain_rows(explainer, batch_texts, job.explain), strict=True)
                )
        data: dict[str, list] = {"row": rows}
        for column in job.keep_columns:
            data[column] = [_as_text(r[column]) for r in records]
        found = [predictions.get(i) for i in range(len(records))]
        data["intent"] = [p.label if p else None for p in found]
        data["confidence"] = [p.score if p else None for p in found]
        data["out_of_scope"] = [p.out_of_scope if p else None for p in found]
        data["top_k"] = [p.top_k if p else [] for p in found]
        data["truncated"] = [p.truncated if p else None for p in found]
        if explainer is not None:
            data["explanations"] = [explanations.get(i) for i in range(len(records))]
        table = pa.Table.from_pydict(data, schema=schema)
        _atomic_parquet(table, parts / f"part-{done:012d}.parquet")
        done += len(records)
        bar.update(len(records))

    rows: list[int] = []
    records: list[dict] = []
    for row, record in shard_rows(job.input, columns, job.shard, skip=done):
        rows.append(row)
        records.append(record)
        if len(records) == job.chunk_size:
            flush(rows, records)
            rows, records = [], []
    if records:
        flush(rows, records)
    bar.close()
    if not any(parts.glob("part-*.parquet")):  # an empty shard still gets a (valid) file
        _atomic_parquet(pa.Table.from_pylist([], schema=schema), parts / f"part-{0:012d}.parquet")
    written = assemble(parts, output)
    shutil.rmtree(parts)
    logger.info("wrote %d rows to %s", written, output)
    return output


# -- plotting a scored archive ------------------------------------------------------------


def read_intents(paths: list[Path]) -> Counter:
    """Intent counts over scored Parquet / JSONL files (empty texts are not counted)."""
    import pyarrow.parquet as pq

    counts: Counter = Counter()
    for path in paths:
        if not path.is_file():
            raise BatchError(f"--scored {path}: no such file")
        if path.suffix.lower() == ".parquet":
            try:
                intents = pq.read_table(path, columns=["intent"]).column("intent").to_pylist()
            except (KeyError, ValueError, OSError) as exc:
                raise BatchError(f"--scored {path}: not a scored archive ({exc})") from None
        elif path.suffix.lower() == ".jsonl":
            with open(path, encoding="utf-8") as handle:
                try:
                    intents = [json.loads(line)["intent"] for line in handle if line.strip()]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise BatchError(f"--scored {path}: not a scored archive ({exc})") from None
        else:
            raise BatchError(f"--scored {path}: use .parquet or .jsonl files")
        counts.update(i for i in intents if i is not None)
    return counts


def plot_distribution(counts: Counter, path: Path, top: int = 30) -> Path:
    """A horizontal bar chart of intent counts (most frequent first), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not counts:
        raise BatchError("nothing to plot: the scored archive has no predictions")
    ranked = counts.most_common()
    if len(ranked) > top:
        rest = sum(n for _, n in ranked[top - 1 :])
        ranked = [*ranked[: top - 1], (f"({len(ranked) - top + 1} other intents)", rest)]
    labels = [label for label, _ in ranked][::-1]
    values = [n for _, n in ranked][::-1]
    total = sum(counts.values())
    colors = ["#c0504d" if label == OUT_OF_SCOPE else "#4f81bd" for label in labels]
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(labels) + 1.2))
    ax.barh(labels, values, color=colors)
    for y, value in enumerate(values):
        ax.text(value, y, f" {value} ({100 * value / total:.1f}%)", va="center", fontsize=8)
    ax.set_xlabel("messages")
    ax.set_title(f"Intent distribution of {total} scored messages")
    ax.margins(x=0.2)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
    return path


# -- command line -------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line on stderr and exit status 2 (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(
        prog="supportlens-predict",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("texts", nargs="*", help="messages to classify")
    parser.add_argument("--bundle", help="bundle directory (…/bundle)")
    parser.add_argument("--file", help="file with one message per line; '-' reads stdin")
    parser.add_argument("--top_k", type=int, default=3, help="intents listed per message")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--json", action="store_true", help="print JSON lines")
    batch = parser.add_argument_group("batch scoring")
    batch.add_argument("--input", type=Path, help="archive to score: .csv, .jsonl or .parquet")
    batch.add_argument("--output", type=Path, help="scored archive: .parquet or .jsonl")
    batch.add_argument("--text_column", default="text")
    batch.add_argument(
        "--keep_columns", default="", help="comma-separated input columns copied to the output"
    )
    batch.add_argument("--shard", default="0/1", help="i/N: score rows whose index %% N == i")
    batch.add_argument("--chunk_size", type=int, default=2048, help="rows per resumable chunk")
    batch.add_argument("--explain", default="", help="comma-separated explanation methods")
    batch.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    batch.add_argument("--overwrite", action="store_true", help="score again from the start")
    batch.add_argument("--no_progress", action="store_true", help="no progress bar")
    plot = parser.add_argument_group("intent-distribution plot")
    plot.add_argument("--plot", type=Path, help="write a PNG bar chart of the intents")
    plot.add_argument(
        "--scored", type=Path, nargs="+", help="scored files to plot (default: --output)"
    )
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1 or args.chunk_size < 1:
        parser.error("--top_k, --batch_size and --chunk_size must be at least 1")
    if args.input and not args.output:
        parser.error("--input needs --output (a .parquet or .jsonl file)")
    if args.input and (args.texts or args.file):
        parser.error("give either --input or messages (TEXT arguments, --file), not both")
    if args.plot and args.plot.suffix.lower() != ".png":
        parser.error(f"--plot {args.plot}: use a .png file name")
    plot_only = args.plot and not args.input and not args.texts and not args.file
    if plot_only and not args.scored:
        parser.error("--plot without --input needs --scored FILE [FILE ...]")
    if not plot_only and not args.bundle:
        parser.error("--bundle is required to classify")
    if not plot_only and not (args.input or args.texts or args.file):
        parser.error("no messages: give TEXT arguments, --file or --input")
    try:
        args.shard = parse_shard(args.shard)
    except BatchError as exc:
        parser.error(str(exc))
    args.plot_only = bool(plot_only)
    return args


def _split(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.plot_only:
            plot_distribution(read_intents(args.scored), args.plot)
            print(f"wrote {args.plot}", file=sys.stderr)
            return 0
        if args.input:
            output = score_archive(
                ScoreJob(
                    bundle=args.bundle,
                    input=args.input,
                    output=args.output,
                    text_column=args.text_column,
                    keep_columns=_split(args.keep_columns),
                    shard=args.shard,
                    top_k=args.top_k,
                    batch_size=args.batch_size,
                    chunk_size=args.chunk_size,
                    explain=_split(args.explain),
                    device=args.device,
                    overwrite=args.overwrite,
                    progress=not args.no_progress,
                )
            )
            if args.plot:
                plot_distribution(read_intents(args.scored or [output]), args.plot)
                print(f"wrote {args.plot}", file=sys.stderr)
            return 0
        texts = read_messages(args.texts, args.file)
        if not texts:
            print("supportlens-predict: error: no messages in --file", file=sys.stderr)
            return 2
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
