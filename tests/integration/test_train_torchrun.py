"""The training CLI under torchrun for real: two processes, DDP through the Trainer with
the gloo backend on CPU, a few steps of the demo data; then a resumed run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from models.bundle import load_bundle

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RECIPE = str(REPO / "training" / "recipes" / "intent" / "demo.yaml")
DEMO = REPO / "training" / "demo"
METRICS = re.compile(r"test: accuracy (\S+), macro-F1 (\S+), ECE (\S+) -> (\S+)")


def torchrun(output_dir: Path, log_dir: Path, backbone: Path, *extra: str) -> dict[int, str]:
    """Run ``train_intent`` on 2 local processes; return each rank's log (stdout + stderr)."""
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", "--nproc_per_node", "2",
        "--log_dir", str(log_dir), "--redirects", "3",
        "-m", "training.train_intent", RECIPE,
        "--train_file", str(DEMO / "intents.csv"),
        "--test_file", str(DEMO / "intents_test.csv"),
        "--backbone", str(backbone),
        "--output_dir", str(output_dir),
        "--max_length", "24",
        "--per_device_train_batch_size", "32",
        "--learning_rate", "1e-3",
        "--save_total_limit", "3",
        "--ddp_backend", "gloo",
        *extra,
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=240, check=False
    )
    logs = {}
    for rank in (0, 1):
        found = sorted(log_dir.glob(f"**/attempt_0/{rank}"))
        assert found, f"no log of rank {rank}: {result.stderr[-2000:]}"
        logs[rank] = "".join(p.read_text(errors="replace") for p in sorted(found[-1].glob("*.log")))
    assert result.returncode == 0, logs[0][-3000:] + logs[1][-3000:] + result.stderr[-2000:]
    return logs


def test_torchrun_ranks_agree_one_bundle_is_written_and_resume_works(tmp_path, tiny_backbone):
    output_dir = tmp_path / "run"
    logs = torchrun(output_dir, tmp_path / "logs-1", tiny_backbone, "--num_train_epochs", "1")

    # Every rank evaluated and found the same figures (gathered over both ranks' shards).
    metrics = {rank: METRICS.findall(log) for rank, log in logs.items()}
    assert metrics[0] and metrics[0] == metrics[1], metrics
    # Exactly one process wrote the report and the bundle.
    writes = sum(log.count("intent-classification: bundle at") for log in logs.values())
    assert writes == 1, {rank: log[-2000:] for rank, log in logs.items()}
    bundle = load_bundle(output_dir / "bundle")
    assert bundle.training["world_size"] == 2
    first_steps = bundle.training["global_step"]
    report = json.loads((output_dir / "report" / "report.json").read_text())
    assert f"{report['metrics']['accuracy']:.4f}" == metrics[0][0][0]
    assert not list(output_dir.glob(".bundle.*")), "a temporary of a second writer was left"

    # Resume: both ranks continue from the last complete checkpoint of the first run.
    logs = torchrun(
        output_dir,
        tmp_path / "logs-2",
        tiny_backbone,
        "--num_train_epochs",
        "2",
        "--resume",
        "true",
    )
    checkpoint = f"checkpoint-{first_steps}"
    assert all(f"resuming from {output_dir / checkpoint}" in log for log in logs.values())
    assert sum(log.count("intent-classification: bundle at") for log in logs.values()) == 1
    resumed = load_bundle(output_dir / "bundle")
    assert resumed.training["resumed_from"] == str(output_dir / checkpoint)
    assert resumed.training["global_step"] == 2 * first_steps
