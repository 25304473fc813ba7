"""Service settings, read once from ``SUPPORTLENS_*`` environment variables.

The parent process reads them at start-up; worker processes receive the same frozen
object (pickled with their API), so every process of one server agrees on them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path

DEFAULT_INTENT_BUNDLE = "runs/demo-intent/bundle"
DEFAULT_SUMMARIZER_BUNDLE = "runs/demo-summarizer/bundle"
# The attribution method shown next to attention on the web page and used by the
# benchmark: among the Captum attributions, the best comprehensiveness per unit of cost
# in benchmarks/results/faithfulness.md.
DEFAULT_ATTRIBUTION = "occlusion"
DEVICES = ("auto", "cpu", "cuda")
LOG_FORMATS = ("text", "json")
# How the model workers run the forward pass: PyTorch, or ONNX Runtime on the bundle's
# ONNX graph (``supportlens-export-onnx``) in SUPPORTLENS_ONNX_PRECISION.
BACKENDS = ("torch", "onnx")
ONNX_PRECISIONS = ("fp32", "int8")
# The arithmetic that scores the perturbed texts of `"faithfulness": true`
# (models.predictor.VARIANT_PRECISIONS): "auto" is bf16 on a CPU that computes it
# natively, fp32 elsewhere.
FAITHFULNESS_PRECISIONS = ("auto", "bf16", "fp32")
MAX_AUTO_WORKERS = 4
# Explanation methods cheap enough to run inside a plain prediction batch.
CHEAP_METHODS = frozenset({"attention"})


class ConfigError(ValueError):
    """An environment variable holds a value the service cannot use; the message names it."""


@dataclass(frozen=True)
class Settings:
    """Every tunable of the service; the field ``x`` comes from ``SUPPORTLENS_X``."""

    intent_bundle: str = DEFAULT_INTENT_BUNDLE
    summarizer_bundle: str = DEFAULT_SUMMARIZER_BUNDLE
    host: str = "127.0.0.1"
    port: int = 8000
    # 0: /metrics on the API port. Otherwise /metrics is served on this port only, so a
    # NetworkPolicy can open it to the monitoring namespace and the API port to clients.
    metrics_port: int = 0
    api_key: str = ""
    api_key_file: str = ""
    device: str = "auto"
    workers: int = 0
    explain_workers: int = 1
    summarize_workers: int = 1
    api_servers: int = 1
    torch_threads: int = 0
    # On (the default): on CPU, a batch that starts while other workers are idle runs
    # with the cores they leave free (a lone request uses every core, as a single process
    # would). Off: each worker keeps its share. It pays only with OpenMP threads that
    # spin briefly between operations (service.server.set_openmp_waiting);
    # benchmarks/results/threads.md compares the policies. See Supervisor.threads_for.
    adaptive_threads: bool = True
    backend: str = "torch"
    onnx_precision: str = "int8"
    max_batch_size: int = 32
    # Deprecated and ignored: batches now form only while every worker is busy, with no
    # waiting. Still parsed so that deployments that set it keep starting (with a warning).
    batch_timeout: float = 0.0
    explain_batch_size: int = 4
    max_texts: int = 32
    max_top_k: int = 20
    max_body_bytes: int = 1_000_000
    max_in_flight: int = 64
    max_explain_in_flight: int = 4
    max_request_cost: int = 100_000
    max_conversation_tokens: int = 4096
    retry_after: int = 1
    queue_timeout: float = 10.0
    request_timeout: float = 30.0
    drain_timeout: float = 25.0
    body_timeout: float = 10.0
    header_timeout: float = 10.0
    keep_alive_timeout: float = 5.0
    worker_hang_timeout: float = 20.0
    strict_length: bool = False
    log_text: bool = False
    log_level: str = "info"
    log_format: str = "text"
    default_attribution: str = DEFAULT_ATTRIBUTION
    ig_steps: int = 32
    faithfulness_precision: str = "auto"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Parse ``SUPPORTLENS_*`` variables; unset ones keep their defaults."""
        environ = os.environ if environ is None else environ
        values = {}
        for spec in fields(cls):
            name = f"SUPPORTLENS_{spec.name.upper()}"
            raw = environ.get(name)
            if raw is None or (raw.strip() == "" and spec.name != "api_key"):
                continue
            values[spec.name] = _parse(name, raw.strip(), spec.default)
        if values.get("api_key_file"):
            if values.get("api_key"):
                raise ConfigError(
                    "SUPPORTLENS_API_KEY and SUPPORTLENS_API_KEY_FILE are both set; set only one"
                )
            values["api_key"] = read_key_file(values["api_key_file"])
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        positive = (
            "explain_workers",
            "summarize_workers",
            "api_servers",
            "max_batch_size",
            "explain_batch_size",
            "max_texts",
            "max_top_k",
            "max_body_bytes",
            "max_in_flight",
            "max_explain_in_flight",
            "max_request_cost",
            "max_conversation_tokens",
            "ig_steps",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"SUPPORTLENS_{name.upper()} must be at least 1")
        for name in (
            "queue_timeout",
            "request_timeout",
            "drain_timeout",
            "body_timeout",
            "header_timeout",
            "keep_alive_timeout",
            "worker_hang_timeout",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(
                    f"SUPPORTLENS_{name.upper()} must be a positive number of seconds"
                )
        if self.batch_timeout < 0:
            raise ConfigError("SUPPORTLENS_BATCH_TIMEOUT must be >= 0")
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"SUPPORTLENS_PORT must be a TCP port, got {self.port}")
        if not 0 <= self.metrics_port <= 65535 or self.metrics_port == self.port:
            raise ConfigError(
                "SUPPORTLENS_METRICS_PORT must be 0 (metrics on the API port) or a TCP port "
                f"other than SUPPORTLENS_PORT, got {self.metrics_port}"
            )
        if self.workers < 0:
            raise ConfigError("SUPPORTLENS_WORKERS must be >= 0 (0 picks one per core)")
        if self.device not in DEVICES:
            raise ConfigError(
                f"SUPPORTLENS_DEVICE must be one of {', '.join(DEVICES)}, got {self.device!r}"
            )
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(
                f"SUPPORTLENS_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}, got {self.log_format!r}"
            )
        if self.torch_threads < 0:
            raise ConfigError("SUPPORTLENS_TORCH_THREADS must be >= 0 (0 picks one per worker)")
        if self.backend not in BACKENDS:
            raise ConfigError(
                f"SUPPORTLENS_BACKEND must be one of {', '.join(BACKENDS)}, got {self.backend!r}"
            )
        if self.onnx_precision not in ONNX_PRECISIONS:
            raise ConfigError(
                f"SUPPORTLENS_ONNX_PRECISION must be one of {', '.join(ONNX_PRECISIONS)}, "
                f"got {self.onnx_precision!r}"
            )
        if self.faithfulness_precision not in FAITHFULNESS_PRECISIONS:
            raise ConfigError(
                "SUPPORTLENS_FAITHFULNESS_PRECISION must be one of "
                f"{', '.join(FAITHFULNESS_PRECISIONS)}, got {self.faithfulness_precision!r}"
            )
        if self.backend == "onnx" and self.device == "cuda":
            raise ConfigError(
                "SUPPORTLENS_BACKEND=onnx runs on CPU; use SUPPORTLENS_BACKEND=torch with "
                "SUPPORTLENS_DEVICE=cuda"
            )

    def bind_host(self) -> str:
        """The address the server's sockets bind to (``localhost`` as IPv4 loopback)."""
        return "127.0.0.1" if self.host == "localhost" else self.host

    def accelerator(self) -> str:
        """``cpu`` or ``cuda``: the device the model workers run on."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def classify_workers(self) -> int:
        """Plain-prediction worker processes (per GPU on ``cuda``); 0 means automatic.

        On CPU, one single-threaded worker per core (up to :data:`MAX_AUTO_WORKERS`):
        while one worker runs its batch the next batch gathers in the queue for
        another, so the cores never wait on the HTTP round trip, and one thread per
        process avoids intra-op synchronisation on small batches.
        """
        if self.workers:
            return self.workers
        if self.accelerator() == "cuda":
            return 1
        return min(MAX_AUTO_WORKERS, available_cores())

    def threads_per_worker(self, workers: int) -> int:
        """Torch threads for one of ``workers`` processes sharing this machine's cores."""
        if self.torch_threads:
            return self.torch_threads
        return max(1, available_cores() // max(1, workers))

    def core_pool(self) -> int:
        """The cores the classify workers share: their threads when all of them are busy."""
        workers = self.classify_workers()
        return workers * self.threads_per_worker(workers)

    def bundle_path(self, which: str) -> Path | None:
        """The bundle to serve for ``which`` ("intent" or "summarizer"), or None to skip it.

        A default path that does not exist means "not trained yet" and is skipped; a
        path set explicitly must exist (the caller verifies it and names the variable).
        """
        value = getattr(self, f"{which}_bundle")
        default = DEFAULT_INTENT_BUNDLE if which == "intent" else DEFAULT_SUMMARIZER_BUNDLE
        if value.lower() in {"none", "off", "-"}:
            return None
        path = Path(value)
        if value == default and not path.exists():
            return None
        return path


def read_key_file(path: str) -> str:
    """The API key stored in ``path`` (a mounted secret), without its trailing newline."""
    try:
        key = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or type(error).__name__
        raise ConfigError(f"SUPPORTLENS_API_KEY_FILE: cannot read {path} ({reason})") from None
    if not key.strip():
        raise ConfigError(f"SUPPORTLENS_API_KEY_FILE: {path} is empty")
    return key


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's cpuset)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _parse(name: str, raw: str, default: object) -> object:
    if isinstance(default, bool):
        if raw.lower() in {"1", "true", "yes", "on"}:
            return True
        if raw.lower() in {"0", "false", "no", "off"}:
            return False
        raise ConfigError(f"{name} must be 0 or 1, got {raw!r}")
    if isinstance(default, int):
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if isinstance(default, float):
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    return raw


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, parsed from the environment on first use."""
    return Settings.from_env()
