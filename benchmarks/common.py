"""What every benchmark script records: the machine, and results kept per device kind."""

from __future__ import annotations

import json
import os
import platform
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    """CPU / GPU description, the load at the time, and library versions for the result table."""
    import torch
    import transformers

    from service.config import available_cores

    cpu_model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "cpu": cpu_model,
        "cpu_count": available_cores(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def hardware(info: dict[str, Any]) -> str:
    """The short device label of a :func:`machine` description: the GPU, else the cores."""
    return info.get("gpu") or f"{info['cpu_count']} CPU cores"


def run_heading(kind: str, run: dict[str, Any]) -> list[str]:
    """The Markdown lines that open one device kind's run: its heading and its command."""
    return ["", f"## {kind} ({hardware(run['machine'])})", "", f"Command: `{run['command']}`", ""]


def machine_sentence(info: dict[str, Any]) -> str:
    """One sentence on the machine of a :func:`machine` description, for a result table."""
    return (
        f"Machine: {info['cpu_count']} CPUs ({info['cpu']}), torch {info['torch']}, "
        f"Python {info['python']}; load average at start {info['load_average_at_start']}."
    )


def write_runs(
    results_dir: str | os.PathLike,
    name: str,
    kind: str,
    run: dict[str, Any],
    render: Callable[[dict[str, Any]], str],
) -> str:
    """Store ``run`` as the ``kind`` (cpu / cuda) run in ``<name>.json``, keeping the other
    kinds' runs, and rewrite ``<name>.md`` from all of them; returns the Markdown."""
    from training.recipe import atomic_write_text

    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    json_path = results_dir / f"{name}.json"
    results = json.loads(json_path.read_text()) if json_path.is_file() else {"runs": {}}
    results["runs"][kind] = run
    markdown = render(results)
    atomic_write_text(json_path, json.dumps(results, indent=2) + "\n")
    atomic_write_text(results_dir / f"{name}.md", markdown)
    return markdown


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation, min and max, rounded to 2 decimals."""
    return {
        "mean": round(statistics.mean(values), 2),
        "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
        "min": round(min(values), 2),
        "max": round(max(values), 2),
    }
