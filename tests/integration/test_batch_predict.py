"""``supportlens-predict`` as a batch scorer: archives in, scored Parquet/JSONL out, shards,
resuming after a real kill, the intent-distribution plot, and bad arguments."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from models.bundle import load_bundle
from models.predictor import IntentPredictor
from training import predict

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
WORDS = [
    "my",
    "card",
    "was",
    "charged",
    "twice",
    "refund",
    "where",
    "is",
    "the",
    "parcel",
    "reset",
    "password",
    "top",
    "up",
    "transfer",
    "failed",
]


def tickets(n: int, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    rows = [
        {"ticket_id": f"T{i:05d}", "body": " ".join(rng.choices(WORDS, k=rng.randint(3, 25)))}
        for i in range(n)
    ]
    rows[3]["body"] = "   "  # an empty message: kept, with no prediction
    return rows


def write_archive(rows: list[dict], path: Path) -> Path:
    if path.suffix == ".csv":
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def score(bundle: Path, archive: Path, output: Path, *extra: str) -> int:
    argv = [
        "--bundle", str(bundle), "--input", str(archive), "--text_column", "body",
        "--keep_columns", "ticket_id", "--output", str(output), "--no_progress", *extra,
    ]  # fmt: skip
    return predict.main(argv)


def read_scored(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def intent_bundle(tiny_bundles) -> Path:
    return tiny_bundles[0]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_batch_scores_every_input_format_like_the_predictor(intent_bundle, tmp_path, suffix):
    rows = tickets(150)
    archive = write_archive(rows, tmp_path / f"tickets{suffix}")
    output = tmp_path / "scored.parquet"
    assert score(intent_bundle, archive, output, "--chunk_size", "40", "--top_k", "2") == 0
    scored = read_scored(output)
    assert [r["row"] for r in scored] == list(range(150))
    assert [r["ticket_id"] for r in scored] == [r["ticket_id"] for r in rows]
    empty = scored[3]
    assert empty["intent"] is None and empty["confidence"] is None and empty["top_k"] == []
    texts = [r["body"] for i, r in enumerate(rows) if i != 3]
    expected = IntentPredictor(load_bundle(intent_bundle)).predict(texts, top_k=2)
    got = [r for i, r in enumerate(scored) if i != 3]
    for row, prediction in zip(got, expected, strict=True):
        assert row["intent"] == prediction.label
        assert row["confidence"] == pytest.approx(prediction.score, abs=1e-6)
        assert row["out_of_scope"] == prediction.out_of_scope
        assert [c["label"] for c in row["top_k"]] == [c["label"] for c in prediction.top_k]
    assert not (tmp_path / "scored.parquet.parts").exists()


def test_batch_writes_jsonl_with_explanations(intent_bundle, tmp_path):
    archive = write_archive(tickets(12), tmp_path / "tickets.csv")
    output = tmp_path / "scored.jsonl"
    assert score(intent_bundle, archive, output, "--explain", "attention") == 0
    scored = read_scored(output)
    assert len(scored) == 12
    words = scored[0]["explanations"]["attention"]["words"]
    body = tickets(12)[0]["body"]
    assert words and all(body[w["start"] : w["end"]] == w["text"] for w in words)


def test_batch_shards_partition_the_archive(intent_bundle, tmp_path):
    archive = write_archive(tickets(101), tmp_path / "tickets.parquet")
    whole = tmp_path / "whole.parquet"
    assert score(intent_bundle, archive, whole) == 0
    output = tmp_path / "scored.parquet"
    for index in range(3):
        assert score(intent_bundle, archive, output, "--shard", f"{index}/3") == 0
    shards = sorted(tmp_path.glob("scored-shard-*-of-00003.parquet"))
    assert len(shards) == 3
    rows = [r for shard in shards for r in read_scored(shard)]
    assert sorted(r["row"] for r in rows) == list(range(101))
    assert all(r["row"] % 3 == i for i, s in enumerate(shards) for r in read_scored(s))
    by_row = {r["row"]: r for r in rows}
    assert [by_row[r["row"]]["intent"] for r in read_scored(whole)] == [
        r["intent"] for r in read_scored(whole)
    ]
    # The plot of all shards, from the same command.
    plot = tmp_path / "intents.png"
    assert predict.main(["--plot", str(plot), "--scored", *map(str, shards)]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    counts = predict.read_intents(shards)
    assert sum(counts.values()) == 100  # the empty message has no intent


def test_batch_resumes_after_a_kill(intent_bundle, tmp_path):
    """Kill the scorer mid-run (SIGKILL), start it again: it resumes after the last
    complete chunk and the result equals an uninterrupted run."""
    archive = write_archive(tickets(2500, seed=1), tmp_path / "tickets.csv")
    reference = tmp_path / "reference.parquet"
    assert (
        score(intent_bundle, archive, reference, "--chunk_size", "200", "--batch_size", "16") == 0
    )
    output = tmp_path / "scored.parquet"
    parts = tmp_path / "scored.parquet.parts"
    command = [
        sys.executable, "-m", "training.predict", "--bundle", str(intent_bundle),
        "--input", str(archive), "--text_column", "body", "--keep_columns", "ticket_id",
        "--output", str(output), "--chunk_size", "100", "--batch_size", "16", "--no_progress",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(list(parts.glob("part-*.parquet"))) < 3:
        assert first.poll() is None, first.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    first.stderr.close()
    done = predict.completed_rows(parts)
    assert 300 <= done < 2500
    assert not output.exists()

    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    assert second.returncode == 0, second.stderr
    resumed_at = int(second.stderr.split("resuming at row ")[1].split()[0])
    assert resumed_at >= done
    resumed, expected = read_scored(output), read_scored(reference)
    assert [(r["row"], r["ticket_id"], r["intent"]) for r in resumed] == [
        (r["row"], r["ticket_id"], r["intent"]) for r in expected
    ]
    for got, want in zip(resumed, expected, strict=True):  # separate processes: float noise
        assert got["confidence"] == pytest.approx(want["confidence"], abs=1e-5, nan_ok=True)
    assert not parts.exists()
    # Started again once complete, it does nothing.
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    assert again.returncode == 0 and "complete already" in again.stderr


def test_batch_refuses_to_resume_chunks_of_another_run(intent_bundle, tmp_path, capsys):
    archive = write_archive(tickets(50), tmp_path / "tickets.csv")
    output = tmp_path / "scored.parquet"
    parts = tmp_path / "scored.parquet.parts"
    parts.mkdir()
    (parts / "meta.json").write_text(json.dumps({"top_k": 7}))
    assert score(intent_bundle, archive, output) == 2
    err = capsys.readouterr().err.strip()
    assert "holds chunks of a different run" in err and len(err.splitlines()) == 1
    assert score(intent_bundle, archive, output, "--overwrite") == 0
    assert len(read_scored(output)) == 50


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--input", "{dir}/tickets.txt", "--output", "{dir}/o.parquet"], "unknown file type"),
        (["--input", "{dir}/missing.csv", "--output", "{dir}/o.parquet"], "no such file"),
        (["--input", "{dir}/tickets.csv", "--output", "{dir}/o.parquet", "--text_column", "nope"], "no column 'nope'"),
        (["--input", "{dir}/tickets.csv", "--output", "{dir}/o.csv"], "use a .parquet or .jsonl"),
        (["--input", "{dir}/tickets.csv", "--output", "{dir}/o.parquet", "--shard", "3/3"], "need 0 <= i < N"),
        (["--input", "{dir}/tickets.csv", "--output", "{dir}/o.parquet", "--shard", "two"], "--shard must look like i/N"),
        (["--input", "{dir}/tickets.csv"], "--input needs --output"),
        (["--input", "{dir}/tickets.csv", "--output", "{dir}/o.parquet", "--keep_columns", "ticket_id,intent"], "clash with the output columns"),
        (["--input", "{dir}/tickets.csv", "--output", "{dir}/o.parquet", "--explain", "magic"], "unknown method"),
        (["--plot", "{dir}/p.png"], "needs --scored"),
        (["--plot", "{dir}/p.png", "--scored", "{dir}/tickets.csv"], "use .parquet or .jsonl"),
    ],
)  # fmt: skip
def test_batch_bad_arguments_exit_2_with_one_line(intent_bundle, tmp_path, capsys, args, message):
    write_archive(tickets(5), tmp_path / "tickets.csv")
    (tmp_path / "tickets.txt").write_text("x\n")
    argv = ["--bundle", str(intent_bundle), *[a.format(dir=tmp_path) for a in args]]
    with pytest.raises(SystemExit) as raised:
        sys.exit(predict.main(argv))
    assert raised.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
