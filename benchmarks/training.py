"""Training throughput: one process vs torchrun (DDP, gloo on CPU), fp32 vs bf16 autocast.

Trains the intent classifier (the default all-MiniLM-L6-v2 backbone, the BANKING77
recipe's batch size per process) for a fixed number of optimizer steps on the BANKING77
training file, as one process using every core and as ``--processes`` processes under
``torchrun`` with one core's share each, each layout in every ``--precisions`` (fp32,
and bf16 autocast: the default where the CPU computes bf16 natively), round after round,
and reports training examples per second (global step x batch per process x processes /
the Trainer's training time, from the bundle's ``training.json``) on every third training
message. Evaluation during training and checkpoints are off; the final evaluation runs
on every 15th test message.

    python benchmarks/training.py --steps 200 --rounds 2

Time to 92.5% BANKING77 test accuracy (issue 13, item 5) needs a GPU and is not
measured here; its recipe is ``training/recipes/intent/banking77-gpu.yaml``, run by
``python benchmarks/banking77.py --recipe training/recipes/intent/banking77-gpu.yaml``. Results: ``benchmarks/results/training.md`` / ``.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import machine, machine_sentence, run_heading, write_runs  # noqa: E402
from service.config import available_cores  # noqa: E402

RECIPE = "training/recipes/intent/banking77.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/banking77", help="BANKING77 folder")
    parser.add_argument(
        "--steps",
        type=int,
        default=200,
        help="optimizer steps per run (short runs understate bf16, whose kernels are built "
        "in the first steps)",
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--processes", type=int, default=2, help="torchrun processes")
    parser.add_argument("--batch", type=int, default=16, help="batch per process")
    parser.add_argument("--threads", type=int, default=available_cores())
    parser.add_argument(
        "--precisions",
        default="fp32,bf16",
        type=lambda value: value.split(","),
        help="training precisions to compare (bf16: autocast; fast only where the CPU has "
        "AVX512-BF16 or AMX)",
    )
    parser.add_argument("--note", default="", help="a remark printed with the table")
    parser.add_argument("--out", default="benchmarks/results/training")
    return parser.parse_args(argv)


def every_nth(source: Path, target: Path, n: int) -> Path:
    """Every ``n``-th row of a CSV file (every intent keeps rows: the files are sorted by
    intent). The final evaluation (and the out-of-scope detector's pass over the training
    split) is not what is timed, so smaller files only shorten the wall time."""
    with open(source, newline="") as handle:
        rows = list(csv.DictReader(handle))[::n]
    with open(target, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return target


def train_once(
    args, processes: int, precision: str, output_dir: Path, files: tuple[Path, Path]
) -> dict:
    threads = max(1, args.threads // processes)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    launcher = (
        [*torchrun, "--nproc_per_node", str(processes)] if processes > 1 else [sys.executable]
    )
    command = [
        *launcher, "-m", "training.train_intent", RECIPE,
        "--train_file", str(files[0]),
        "--test_file", str(files[1]),
        "--output_dir", str(output_dir),
        "--max_steps", str(args.steps),
        "--per_device_train_batch_size", str(args.batch),
        "--eval_strategy", "no", "--save_strategy", "no",
        "--load_best_model_at_end", "false", "--early_stopping_patience", "0",
        "--logging_strategy", "no", "--report_to", "none",
        "--bf16", str(precision == "bf16").lower(),
    ]  # fmt: skip
    if processes > 1:
        command += ["--ddp_backend", "gloo"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"training benchmark: run failed:\n{result.stderr[-3000:]}")
    training = json.loads((output_dir / "bundle" / "training.json").read_text())
    examples = training["global_step"] * args.batch * training["world_size"]
    return {
        "processes": training["world_size"],
        "threads_per_process": threads,
        "global_step": training["global_step"],
        "examples": examples,
        "train_time_s": training["train_time_s"],
        "examples_per_s": round(examples / training["train_time_s"], 1),
        "wall_time_s": round(time.perf_counter() - started, 1),
    }


def layout(processes: int, threads: int) -> str:
    if processes == 1:
        return f"1 process x {threads} threads"
    return f"{processes} processes (torchrun, gloo) x {max(1, threads // processes)} thread(s)"


def layout_name(processes: int, threads: int, precision: str) -> str:
    """A cell's name: its layout and precision (each cell also keeps both on their own)."""
    return f"{layout(processes, threads)}, {precision}"


def recorded(argv) -> list[str]:
    """The arguments that change what is measured (not ``--note`` / ``--out``)."""
    given, kept, skip = list(argv if argv is not None else sys.argv[1:]), [], False
    for arg in given:
        if skip:
            skip = False
        elif arg in ("--note", "--out"):
            skip = True
        elif not arg.startswith(("--note=", "--out=")):
            kept.append(arg)
    return kept


def main(argv=None) -> int:
    args = parse_args(argv)
    data = Path(args.data)
    if not (data / "train.csv").is_file():
        raise SystemExit(f"training benchmark: no BANKING77 train.csv in {data} (use --data)")
    run: dict = {
        "machine": machine(),
        "command": " ".join(["python benchmarks/training.py", *recorded(argv)]),
        "steps": args.steps,
        "batch_per_process": args.batch,
        "rounds": args.rounds,
        "note": args.note,
        "layouts": {},
    }
    samples: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="supportlens-train-bench-") as tmp:
        files = (
            every_nth(data / "train.csv", Path(tmp) / "train.csv", 3),
            every_nth(data / "test.csv", Path(tmp) / "test.csv", 15),
        )
        for round_ in range(args.rounds):
            for processes in (1, args.processes):
                for precision in args.precisions:
                    name = layout_name(processes, args.threads, precision)
                    output_dir = Path(tmp) / f"run-{round_}-{processes}-{precision}"
                    cell = train_once(args, processes, precision, output_dir, files)
                    described = {"layout": layout(processes, args.threads), "precision": precision}
                    samples.setdefault(name, []).append({**described, **cell})
                    print(f"round {round_ + 1}: {name}: {cell}", flush=True)
    for name, cells in samples.items():
        rates = [c["examples_per_s"] for c in cells]
        median = statistics.median_low(rates)
        run["layouts"][name] = {
            **next(c for c in cells if c["examples_per_s"] == median),
            "examples_per_s_by_round": rates,
        }

    def rate(processes: int, precision: str) -> float:
        return run["layouts"][layout_name(processes, args.threads, precision)]["examples_per_s"]

    run["speedups"] = {
        f"torchrun ({args.processes} processes) / 1 process, {precision}": round(
            rate(args.processes, precision) / rate(1, precision), 2
        )
        for precision in args.precisions
    }
    if len(args.precisions) == 2:
        for processes in (1, args.processes):
            run["speedups"][f"bf16 / fp32, {layout(processes, args.threads)}"] = round(
                rate(processes, "bf16") / rate(processes, "fp32"), 2
            )
    print(write_runs(Path(args.out).parent, Path(args.out).name, "cpu", run, render))
    return 0


def render(results: dict) -> str:
    lines = [
        "# Training throughput: one process vs torchrun, fp32 vs bf16",
        "",
        "The intent classifier (all-MiniLM-L6-v2, BANKING77 recipe) trained for a fixed number "
        "of steps on BANKING77 `train.csv`, as one process and as several processes under "
        "`torchrun` (DistributedDataParallel through the Trainer), each in fp32 and under bf16 "
        "autocast; examples/s = global step x batch per process x processes / the Trainer's "
        "training time. Each row shows its median round.",
    ]
    for kind, run in sorted(results["runs"].items()):
        m = run["machine"]
        lines += [
            *run_heading(kind, run),
            f"{machine_sentence(m)} {run['steps']} steps of {run['batch_per_process']} examples per process; "
            f"rounds: {run['rounds']}.",
            "",
            *([run["note"], ""] if run.get("note") else []),
            "| layout | precision | examples/s (median round) | by round | steps | training time s |",
            "|---|---|---|---|---|---|",
        ]
        for cell in run["layouts"].values():
            rounds = " / ".join(str(x) for x in cell["examples_per_s_by_round"])
            lines.append(
                f"| {cell['layout']} | {cell['precision']} | {cell['examples_per_s']} | {rounds} | "
                f"{cell['global_step']} | {cell['train_time_s']} |"
            )
        lines += [
            "",
            "| speed-up | value |",
            "|---|---|",
            *[f"| {name} | **{value}x** |" for name, value in run["speedups"].items()],
            "",
            "Time to 92.5% BANKING77 test accuracy: not measured (it needs a GPU; none was "
            "available for this run).",
        ]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
