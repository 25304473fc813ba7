"""Service settings: parsing ``SUPPORTLENS_*`` variables and sizing the worker pools."""

import pytest

from service import config
from service.config import ConfigError, Settings

pytestmark = pytest.mark.unit


def test_settings_defaults_when_environment_is_empty():
    settings = Settings.from_env({})
    assert settings == Settings()
    assert settings.device == "auto" and settings.workers == 0


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("SUPPORTLENS_WORKERS", "two", "SUPPORTLENS_WORKERS must be an integer"),
        ("SUPPORTLENS_WORKERS", "-1", "SUPPORTLENS_WORKERS must be >= 0"),
        ("SUPPORTLENS_DEVICE", "tpu", "SUPPORTLENS_DEVICE must be one of auto, cpu, cuda"),
        ("SUPPORTLENS_QUEUE_TIMEOUT", "soon", "SUPPORTLENS_QUEUE_TIMEOUT must be a number"),
        ("SUPPORTLENS_STRICT_LENGTH", "maybe", "SUPPORTLENS_STRICT_LENGTH must be 0 or 1"),
        ("SUPPORTLENS_MAX_BATCH_SIZE", "0", "SUPPORTLENS_MAX_BATCH_SIZE must be at least 1"),
        ("SUPPORTLENS_PORT", "70000", "SUPPORTLENS_PORT must be a TCP port"),
    ],
)
def test_settings_bad_value_names_the_variable(variable, value, message):
    with pytest.raises(ConfigError, match=message):
        Settings.from_env({variable: value})


@pytest.mark.parametrize(("cores", "expected"), [(1, 1), (2, 2), (3, 3), (16, 4)])
def test_settings_automatic_workers_one_per_core_on_cpu(monkeypatch, cores, expected):
    monkeypatch.setattr(config, "available_cores", lambda: cores)
    settings = Settings.from_env({"SUPPORTLENS_DEVICE": "cpu"})
    workers = settings.classify_workers()
    assert workers == expected
    # The pool shares the cores: single-threaded workers unless there are spare cores.
    assert settings.threads_per_worker(workers) == max(1, cores // expected)


def test_settings_explicit_workers_and_threads_are_kept(monkeypatch):
    monkeypatch.setattr(config, "available_cores", lambda: 8)
    settings = Settings.from_env(
        {"SUPPORTLENS_WORKERS": "3", "SUPPORTLENS_TORCH_THREADS": "2", "SUPPORTLENS_DEVICE": "cpu"}
    )
    assert settings.classify_workers() == 3
    assert settings.threads_per_worker(3) == 2


def test_settings_one_worker_per_gpu_on_cuda(monkeypatch):
    monkeypatch.setattr(config, "available_cores", lambda: 16)
    settings = Settings.from_env({"SUPPORTLENS_DEVICE": "cuda"})
    assert settings.accelerator() == "cuda"
    assert settings.classify_workers() == 1


def test_settings_auto_device_follows_torch(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert Settings.from_env({}).accelerator() == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert Settings.from_env({}).accelerator() == "cuda"


def test_settings_api_key_file_is_read_once_without_trailing_newline(tmp_path):
    key_file = tmp_path / "api-key"
    key_file.write_text("s3cret-key\n")
    settings = Settings.from_env({"SUPPORTLENS_API_KEY_FILE": str(key_file)})
    assert settings.api_key == "s3cret-key"
    key_file.write_text("changed\n")  # read at start-up only
    assert settings.api_key == "s3cret-key"


@pytest.mark.parametrize("content", [None, "", "\n"])
def test_settings_unreadable_or_empty_key_file_names_the_variable(tmp_path, content):
    key_file = tmp_path / "api-key"
    if content is not None:
        key_file.write_text(content)
    with pytest.raises(ConfigError, match="SUPPORTLENS_API_KEY_FILE"):
        Settings.from_env({"SUPPORTLENS_API_KEY_FILE": str(key_file)})


def test_settings_key_and_key_file_together_are_refused(tmp_path):
    key_file = tmp_path / "api-key"
    key_file.write_text("a\n")
    with pytest.raises(ConfigError, match="SUPPORTLENS_API_KEY and SUPPORTLENS_API_KEY_FILE"):
        Settings.from_env({"SUPPORTLENS_API_KEY": "b", "SUPPORTLENS_API_KEY_FILE": str(key_file)})


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("SUPPORTLENS_LOG_FORMAT", "xml", "SUPPORTLENS_LOG_FORMAT must be one of text, json"),
        ("SUPPORTLENS_BODY_TIMEOUT", "0", "SUPPORTLENS_BODY_TIMEOUT must be a positive"),
        ("SUPPORTLENS_MAX_REQUEST_COST", "0", "SUPPORTLENS_MAX_REQUEST_COST must be at least 1"),
        ("SUPPORTLENS_METRICS_PORT", "8000", "SUPPORTLENS_METRICS_PORT must be 0 .* other than"),
        ("SUPPORTLENS_METRICS_PORT", "-1", "SUPPORTLENS_METRICS_PORT must be 0"),
        (
            "SUPPORTLENS_FAITHFULNESS_PRECISION",
            "fp16",
            "SUPPORTLENS_FAITHFULNESS_PRECISION must be one of auto, bf16, fp32, got 'fp16'",
        ),
    ],
)
def test_settings_new_limits_are_validated(variable, value, message):
    with pytest.raises(ConfigError, match=message):
        Settings.from_env({variable: value})


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"SUPPORTLENS_BACKEND": "tensorrt"}, "SUPPORTLENS_BACKEND must be one of torch, onnx"),
        (
            {"SUPPORTLENS_BACKEND": "onnx", "SUPPORTLENS_ONNX_PRECISION": "int4"},
            "SUPPORTLENS_ONNX_PRECISION must be one of fp32, int8, got 'int4'",
        ),
        (
            {"SUPPORTLENS_BACKEND": "onnx", "SUPPORTLENS_DEVICE": "cuda"},
            "SUPPORTLENS_BACKEND=onnx runs on CPU",
        ),
    ],
)
def test_settings_backend_is_validated(environ, message):
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(environ)


def test_settings_backend_is_read_once_and_frozen():
    settings = Settings.from_env(
        {"SUPPORTLENS_BACKEND": "onnx", "SUPPORTLENS_ONNX_PRECISION": "fp32"}
    )
    assert (settings.backend, settings.onnx_precision) == ("onnx", "fp32")
    assert Settings().backend == "torch"
    with pytest.raises(AttributeError):
        settings.backend = "torch"


def test_settings_faithfulness_precisions_are_the_predictors():
    from models.predictor import VARIANT_PRECISIONS
    from service.config import FAITHFULNESS_PRECISIONS

    assert FAITHFULNESS_PRECISIONS == VARIANT_PRECISIONS
    assert Settings().faithfulness_precision == "auto"
    settings = Settings.from_env({"SUPPORTLENS_FAITHFULNESS_PRECISION": "fp32"})
    assert settings.faithfulness_precision == "fp32"
