"""The retraining pipeline: train a candidate, compare it with the model now serving on
the same held-out file, promote it only when it is at least as good, roll back in one step.

A models volume holds one directory per task::

    <models_dir>/versions/<version>/            a training run's output (checkpoints, report/)
    <models_dir>/versions/<version>/bundle/     its bundle
    <models_dir>/versions/<version>/promotion.json   the decision and both models' figures
    <models_dir>/current  -> versions/<version>  what the server loads (.../current/bundle)
    <models_dir>/previous -> versions/<version>  what ``rollback`` returns to
    <models_dir>/history.jsonl                   one line per pointer change

``current`` and ``previous`` are relative symlinks, switched by renaming a new symlink
over the old one: a reader sees the old version or the new one, never neither. After a
switch the serving pods are moved to the new version by a rolling restart of their
Deployment (the ``kubectl rollout restart`` annotation, patched through the API server
with the pod's service-account token); outside Kubernetes that step is skipped.

    supportlens-retrain run --models_dir /models/intent --heldout_file heldout.csv \\
        --label_column intent --restart_deployment supportlens \\
        -- training/recipes/intent/banking77.yaml --train_file /data/train.csv
    supportlens-retrain rollback --models_dir /models/intent --restart_deployment supportlens
    supportlens-retrain status --models_dir /models/intent

Everything after ``--`` goes to ``training.train_intent`` (a recipe and ``--key value``
overrides); ``--launcher "torchrun --nproc_per_node=4"`` trains on several GPUs. A run
whose pod restarts continues the same version (``--version``; in a Job, by default
``$JOB_NAME-$JOB_UID``): from its last checkpoint, or straight to evaluation when its bundle
is complete.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from models.bundle import BundleError, load_bundle, verify_bundle
from models.files import atomic_write_json
from models.predictor import IntentPredictor

TASK = "intent-classification"
METRICS = ("macro_f1", "accuracy")
VERSIONS = "versions"
CURRENT = "current"
PREVIOUS = "previous"
HISTORY = "history.jsonl"
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"
logger = logging.getLogger("training.promote")


class PipelineError(ValueError):
    """The pipeline cannot go on (bad arguments, a broken models volume); the message says why."""


# -- the models volume --------------------------------------------------------------------


def bundle_of(models_dir: Path, version: str) -> Path:
    return models_dir / VERSIONS / version / "bundle"


def pointed_version(models_dir: Path, name: str = CURRENT) -> str | None:
    """The version ``current`` (or ``previous``) points to, None when it does not exist."""
    link = models_dir / name
    if not link.is_symlink():
        if link.exists():
            raise PipelineError(f"{link} must be a symlink made by this tool, not a directory")
        return None
    target = Path(os.readlink(link))
    if target.parent.name != VERSIONS or len(target.parts) != 2:
        raise PipelineError(f"{link} points to {target}, not to {VERSIONS}/<version>")
    return target.name


def point(models_dir: Path, name: str, version: str) -> None:
    """Atomically make ``<models_dir>/<name>`` point to ``versions/<version>``.

    A new symlink is made under a temporary name and renamed over the old one
    (``rename(2)`` replaces it in one step), then the directory is synced.
    """
    link = models_dir / name
    if link.exists() and not link.is_symlink():
        raise PipelineError(f"{link} must be a symlink made by this tool, not a directory")
    tmp = models_dir / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
    os.symlink(f"{VERSIONS}/{version}", tmp)
    try:
        os.replace(tmp, link)
    finally:
        if tmp.is_symlink():
            tmp.unlink()
    descriptor = os.open(models_dir, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def record(models_dir: Path, event: dict[str, Any]) -> None:
    """Append one line to the history (a single small write: lines never interleave)."""
    line = json.dumps({"time": datetime.now(UTC).isoformat(timespec="seconds"), **event})
    with open(models_dir / HISTORY, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")


def switch(models_dir: Path, version: str, action: str, **details: Any) -> None:
    """``previous`` := what serves now, then ``current`` := ``version``."""
    serving = pointed_version(models_dir)
    if serving and serving != version:
        point(models_dir, PREVIOUS, serving)
    point(models_dir, CURRENT, version)
    record(models_dir, {"action": action, "from": serving, "to": version, **details})
    logger.info("%s: current -> %s (was %s)", action, version, serving)


# -- evaluation ---------------------------------------------------------------------------


def evaluate_bundle(
    bundle_dir: Path,
    heldout: Path,
    text_column: str = "text",
    label_column: str = "label",
    batch_size: int = 64,
) -> dict[str, float]:
    """Accuracy and macro-F1 of a bundle's top intent on a labelled held-out file.

    The top-1 intent is compared with the label (the out-of-scope threshold is a
    deployment choice, not part of the comparison); a held-out label the model does not
    know counts as an error. Rows with an empty text are skipped.
    """
    from sklearn.metrics import accuracy_score, f1_score

    from training.predict import BatchError, read_columns

    try:
        texts: list[str] = []
        labels: list[str] = []
        for batch in read_columns(heldout, [text_column, label_column]):
            for text, label in zip(batch[text_column], batch[label_column], strict=True):
                if isinstance(text, str) and text.strip():
                    texts.append(text)
                    labels.append(str(label))
    except BatchError as exc:
        raise PipelineError(str(exc).replace("--input", "--heldout_file")) from None
    if not texts:
        raise PipelineError(f"--heldout_file {heldout}: no rows with a text")
    predictor = IntentPredictor(load_bundle(bundle_dir, task=TASK))
    predicted: list[str] = []
    for start in range(0, len(texts), batch_size):
        batch = predictor.predict(texts[start : start + batch_size], top_k=1)
        predicted += [str(p.top_k[0]["label"]) for p in batch]
    return {
        "accuracy": float(accuracy_score(labels, predicted)),
        "macro_f1": float(
            f1_score(
                labels, predicted, labels=sorted(set(labels)), average="macro", zero_division=0
            )
        ),
        "examples": len(texts),
    }


@dataclass
class Decision:
    """Whether a candidate replaces the serving model, and the figures behind it."""

    candidate: str
    serving: str | None
    metric: str
    margin: float
    candidate_metrics: dict[str, float]
    serving_metrics: dict[str, float] | None
    promoted: bool
    reason: str


def decide(
    candidate: str,
    candidate_metrics: dict[str, float],
    serving: str | None,
    serving_metrics: dict[str, float] | None,
    metric: str,
    margin: float,
) -> Decision:
    """Promote when nothing serves yet, or when ``candidate >= serving + margin`` on ``metric``."""
    if serving is None or serving_metrics is None:
        promoted, reason = True, "nothing is serving yet"
    else:
        needed = serving_metrics[metric] + margin
        promoted = candidate_metrics[metric] >= needed
        comparison = ">=" if promoted else "<"
        reason = (
            f"{metric} {candidate_metrics[metric]:.4f} {comparison} {needed:.4f} "
            f"(serving {serving_metrics[metric]:.4f} {margin:+.4f})"
        )
    return Decision(
        candidate, serving, metric, margin, candidate_metrics, serving_metrics, promoted, reason
    )


# -- the rolling restart ------------------------------------------------------------------


def in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and (SERVICE_ACCOUNT / "token").is_file()


def restart_deployment(
    name: str,
    *,
    namespace: str | None = None,
    api_url: str | None = None,
    token: str | None = None,
    ca_file: str | None = None,
    timeout: float = 30.0,
) -> str:
    """Start a rolling restart of Deployment ``name``, as ``kubectl rollout restart`` does.

    Patches the pod template's ``kubectl.kubernetes.io/restartedAt`` annotation; the
    Deployment controller then replaces the pods within the rollout strategy (and the
    PodDisruptionBudget), so the new pods load the bundle ``current`` points to. Without
    explicit arguments it uses the pod's service account. Returns the timestamp set.
    """
    if api_url is None:
        host = os.environ["KUBERNETES_SERVICE_HOST"]
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        api_url = f"https://{host}:{port}"
        token = (SERVICE_ACCOUNT / "token").read_text().strip()
        ca_file = str(SERVICE_ACCOUNT / "ca.crt")
        namespace = namespace or (SERVICE_ACCOUNT / "namespace").read_text().strip()
    if not namespace:
        raise PipelineError("restart: no namespace")
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    patch = {"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: stamp}}}}}
    request = urllib.request.Request(
        f"{api_url}/apis/apps/v1/namespaces/{namespace}/deployments/{name}",
        data=json.dumps(patch).encode(),
        method="PATCH",
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/strategic-merge-patch+json",
            "Accept": "application/json",
        },
    )
    context = ssl.create_default_context(cafile=ca_file) if api_url.startswith("https") else None
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            response.read()
    except urllib.error.HTTPError as exc:
        raise PipelineError(
            f"restart of deployment/{name} refused: HTTP {exc.code} {exc.reason}"
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        raise PipelineError(f"restart of deployment/{name} failed: {exc}") from None
    logger.info("rolling restart of deployment/%s started (%s)", name, stamp)
    return stamp


def maybe_restart(name: str | None) -> None:
    """Restart ``name`` when running in a cluster; say why not otherwise."""
    if not name:
        logger.info("no --restart_deployment: serving pods pick the new version up when restarted")
    elif not in_cluster():
        logger.info("not running in Kubernetes: skipping the restart of deployment/%s", name)
    else:
        restart_deployment(name)


# -- steps --------------------------------------------------------------------------------


def train_candidate(
    models_dir: Path, version: str, train_args: list[str], launcher: str | None
) -> Path:
    """Train ``version`` (resuming its checkpoints) unless its bundle is complete already."""
    output_dir = models_dir / VERSIONS / version
    bundle = output_dir / "bundle"
    if bundle.is_dir():
        logger.info("version %s is trained already: evaluating it", version)
        return bundle
    command = shlex.split(launcher) if launcher else [sys.executable]
    command += ["-m", "training.train_intent", *train_args, "--output_dir", str(output_dir)]
    if any(output_dir.glob("checkpoint-*")):
        command += ["--resume", "true"]
    logger.info("training: %s", shlex.join(command))
    completed = subprocess.run(command, check=False)
    if completed.returncode != 0:
        raise PipelineError(f"training failed with exit status {completed.returncode}")
    return bundle


def evaluate_and_promote(
    models_dir: Path,
    candidate: str,
    heldout: Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    metric: str = "macro_f1",
    margin: float = 0.0,
) -> Decision:
    """Verify the candidate, evaluate it and the serving model, switch ``current`` if it wins."""
    candidate_bundle = bundle_of(models_dir, candidate)
    verify_bundle(candidate_bundle)
    serving = pointed_version(models_dir)
    candidate_metrics = evaluate_bundle(candidate_bundle, heldout, text_column, label_column)
    serving_metrics = None
    broken = None
    if serving is not None and serving != candidate:
        try:
            serving_metrics = evaluate_bundle(
                bundle_of(models_dir, serving), heldout, text_column, label_column
            )
        except BundleError as exc:  # a serving model that no longer loads loses to any candidate
            broken = str(exc)
    elif serving == candidate:
        serving_metrics = candidate_metrics
    decision = decide(candidate, candidate_metrics, serving, serving_metrics, metric, margin)
    if broken:
        decision.reason = f"the serving bundle is unusable: {broken}"
    atomic_write_json(
        models_dir / VERSIONS / candidate / "promotion.json",
        {**asdict(decision), "heldout_file": str(heldout)},
    )
    if not decision.promoted:
        logger.info(
            "candidate %s refused: %s; current stays %s", candidate, decision.reason, serving
        )
    elif serving == candidate:
        logger.info("candidate %s is serving already", candidate)
    else:
        logger.info("candidate %s promoted: %s", candidate, decision.reason)
        switch(models_dir, candidate, "promote", metric=metric, reason=decision.reason)
    return decision


def rollback(models_dir: Path, to: str | None = None) -> str:
    """Point ``current`` back at ``previous`` (or at ``to``), after verifying that bundle."""
    target = to or pointed_version(models_dir, PREVIOUS)
    if target is None:
        raise PipelineError(f"{models_dir}: no previous version to roll back to")
    try:
        verify_bundle(bundle_of(models_dir, target))
    except BundleError as exc:
        raise PipelineError(f"cannot roll back to {target}: {exc}") from None
    switch(models_dir, target, "rollback")
    return target


def status(models_dir: Path) -> dict[str, Any]:
    versions = sorted(p.name for p in (models_dir / VERSIONS).glob("*") if p.is_dir())
    return {
        "current": pointed_version(models_dir),
        "previous": pointed_version(models_dir, PREVIOUS),
        "versions": versions,
    }


# -- command line -------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line on stderr and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def default_version() -> str:
    """``<job name>-<job uid>`` in a Kubernetes Job (the same across its pod restarts,
    new for every Job), else a UTC timestamp."""
    name, uid = os.environ.get("JOB_NAME"), os.environ.get("JOB_UID", "")
    if name:
        return f"{name}-{uid[:8]}" if uid else name
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, train_args = argv[:cut], argv[cut + 1 :]
    parser = _Parser(
        prog="supportlens-retrain",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--models_dir", type=Path, required=True, help="e.g. /models/intent")

    def judged(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--heldout_file", type=Path, required=True, help="labelled CSV/JSONL/Parquet"
        )
        sub.add_argument("--text_column", default="text")
        sub.add_argument("--label_column", default="label")
        sub.add_argument("--metric", default="macro_f1", choices=METRICS)
        sub.add_argument(
            "--margin",
            type=float,
            default=0.0,
            help="the candidate needs metric >= serving + margin (negative: tolerate a drop)",
        )
        sub.add_argument("--restart_deployment", help="Deployment to restart after a switch")

    run = commands.add_parser(
        "run", help="train a candidate, evaluate, promote if at least as good"
    )
    common(run)
    judged(run)
    run.add_argument(
        "--version", default=None, help="candidate name (default: Job name-uid, or time)"
    )
    run.add_argument("--launcher", default=None, help='e.g. "torchrun --nproc_per_node=4"')
    promote = commands.add_parser("promote", help="evaluate a trained version, promote if better")
    common(promote)
    judged(promote)
    promote.add_argument("--candidate", required=True, help="a version under versions/")
    back = commands.add_parser("rollback", help="current := previous (or --to VERSION)")
    common(back)
    back.add_argument("--to", default=None, help="a version under versions/")
    back.add_argument("--restart_deployment", help="Deployment to restart after the switch")
    show = commands.add_parser("status", help="print current, previous and the versions")
    common(show)
    args = parser.parse_args(argv)
    if args.command == "run" and not train_args:
        parser.error("run needs the training arguments after `--` (a recipe and overrides)")
    if args.command != "run" and train_args:
        parser.error(f"{args.command} takes no training arguments")
    for name in ("version", "candidate", "to"):
        value = getattr(args, name, None)
        if value is not None and (not value or "/" in value or value.startswith(".")):
            parser.error(f"--{name} must be a plain directory name, got {value!r}")
    return args, train_args


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 when the step is done (a refused candidate included), 2 on bad input,
    1 when training or the restart fails."""
    args, train_args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    models_dir: Path = args.models_dir
    if args.command in ("run", "promote") and not args.heldout_file.is_file():
        print(
            f"supportlens-retrain: error: --heldout_file {args.heldout_file}: no such file",
            file=sys.stderr,
        )
        return 2
    try:
        if args.command == "status":
            print(json.dumps(status(models_dir), indent=2))
            return 0
        if args.command == "rollback":
            rollback(models_dir, args.to)
            maybe_restart(args.restart_deployment)
            return 0
        (models_dir / VERSIONS).mkdir(parents=True, exist_ok=True)
        if args.command == "run":
            version = args.version or default_version()
            started = time.perf_counter()
            train_candidate(models_dir, version, train_args, args.launcher)
            logger.info("candidate %s trained in %.0f s", version, time.perf_counter() - started)
        else:
            version = args.candidate
        decision = evaluate_and_promote(
            models_dir,
            version,
            args.heldout_file,
            text_column=args.text_column,
            label_column=args.label_column,
            metric=args.metric,
            margin=args.margin,
        )
        print(json.dumps(asdict(decision)))
        if decision.promoted:
            maybe_restart(args.restart_deployment)
        return 0
    except (PipelineError, BundleError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1 if str(exc).startswith(("training failed", "restart")) else 2


if __name__ == "__main__":
    sys.exit(main())
