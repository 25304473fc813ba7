"""Hostile and careless clients against the main test server: invalid Unicode, costly
requests, requests whose deadline passes, and what every answer carries."""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.integration.conftest import API_KEY, worker_pids
from tests.integration.test_service_api import CONVERSATION, MESSAGES, _samples, post

pytestmark = pytest.mark.integration


def post_raw(server, path, data: bytes, headers):
    return requests.post(
        f"{server.url}{path}",
        data=data,
        headers={**headers, "Content-Type": "application/json"},
        timeout=30,
    )


@pytest.mark.parametrize("path", ["/v1/classify", "/v1/summarize"])
@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b'{"texts": ["fine", "\\ud800"]}', "lone surrogate"),  # JSON escape
        (b'{"texts": ["fine", "\xed\xa0\x80"]}', "lone surrogate"),  # raw UTF-8 bytes ED A0 80
        (b'{"texts": ["fine", "nul \\u0000 byte"]}', "control character"),
        (b'{"texts": ["fine", "bell \\u0007"]}', "control character"),
    ],
)
def test_service_invalid_unicode_gets_422_naming_field_and_index(server, auth, path, raw, words):
    response = post_raw(server, path, raw, auth)
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["errors"][0]["field"] == "texts[1]"
    assert words in body["detail"] and "texts[1]" in body["detail"]


def test_service_invalid_utf8_body_is_a_client_error(server, auth):
    response = post_raw(server, "/v1/classify", b'{"texts": ["caf\xff"]}', auth)
    assert response.status_code == 400
    assert set(response.json()) == {"detail", "errors"}


def test_service_surrogates_do_not_fail_their_neighbours(server, auth):
    bad = b'{"texts": ["\\ud800 lost card"]}'

    def hostile(_):
        return post_raw(server, "/v1/classify", bad, auth).status_code

    def good(i):
        return post(server, "/v1/classify", {"text": MESSAGES[i % len(MESSAGES)]}, auth).status_code

    with ThreadPoolExecutor(4) as pool:
        bad_statuses = pool.map(hostile, range(40))
        good_statuses = [good(i) for i in range(20)]  # one at a time, beside the flood
        assert set(bad_statuses) == {422}
    assert set(good_statuses) == {200}


def test_service_request_over_the_cost_budget_gets_413_before_any_work(server, auth):
    before = requests.get(f"{server.url}/metrics", timeout=5).text
    long_text = "my card payment was declined again today " * 8  # over the 64-token limit
    body = {
        "texts": [long_text] * 8,
        "explain": [
            "attention",
            "rollout",
            "integrated_gradients",
            "gradient_x_input",
            "occlusion",
        ],
    }
    started = time.monotonic()
    response = post(server, "/v1/classify", body, auth)
    assert response.status_code == 413
    assert "SUPPORTLENS_MAX_REQUEST_COST" in response.json()["detail"]
    assert time.monotonic() - started < 2
    after = requests.get(f"{server.url}/metrics", timeout=5).text
    # No explanation batch ran for it.
    assert _samples(after, "supportlens_batch_size_count", api="/v1/classify/explain") == (
        _samples(before, "supportlens_batch_size_count", api="/v1/classify/explain")
    )
    # The same request with one text and one cheap method is served.
    small = {"texts": [long_text], "explain": ["gradient_x_input"]}
    assert post(server, "/v1/classify", small, auth).status_code == 200


def test_service_conversation_over_the_token_cap_gets_422(server, auth):
    huge = "Customer: my parcel never arrived. " * 100  # ~700 tokens, over the 300 cap
    response = post(server, "/v1/summarize", {"texts": [CONVERSATION, huge]}, auth)
    assert response.status_code == 422
    body = response.json()
    assert body["errors"][0]["field"] == "texts[1]"
    assert "SUPPORTLENS_MAX_CONVERSATION_TOKENS" in body["detail"]


def test_service_expired_request_is_dropped_before_compute_and_holds_its_slot(server, auth):
    (summarizer,) = worker_pids(server, "v1-summarize")[-1:]
    import psutil

    worker = psutil.Process(summarizer)
    before = requests.get(f"{server.url}/metrics", timeout=5).text
    worker.send_signal(signal.SIGSTOP)
    try:
        response = post(server, "/v1/summarize", {"texts": [CONVERSATION]}, auth)
        assert response.status_code == 504
        # Answered, but its work has not ended: the in-flight slot is still taken.
        metrics = requests.get(f"{server.url}/metrics", timeout=5).text
        assert _samples(metrics, "supportlens_in_flight_requests") == 1
    finally:
        worker.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        metrics = requests.get(f"{server.url}/metrics", timeout=5).text
        if _samples(metrics, "supportlens_in_flight_requests") == 0:
            break
        time.sleep(0.1)
    assert _samples(metrics, "supportlens_in_flight_requests") == 0
    # The worker got the request after its deadline and skipped it: no batch ran.
    assert _samples(metrics, "supportlens_batch_size_count", api="/v1/summarize") == _samples(
        before, "supportlens_batch_size_count", api="/v1/summarize"
    )
    assert post(server, "/v1/summarize", {"texts": [CONVERSATION]}, auth).status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/nowhere", 404),
        ("DELETE", "/v1/classify", 405),
        ("POST", "/v1/classify", 401),
        ("GET", "/info", 404),
        ("GET", "/docs", 404),
    ],
)
def test_service_every_error_has_one_shape(server, method, path, status):
    headers = {"X-API-Key": API_KEY} if status == 405 else {}
    response = requests.request(method, f"{server.url}{path}", headers=headers, timeout=10)
    assert response.status_code == status
    body = response.json()
    assert set(body) == {"detail", "errors"} and isinstance(body["errors"], list)


def test_service_validation_errors_list_each_field(server, auth):
    response = post(server, "/v1/classify", {"texts": ["ok", ""], "top_k": 0}, auth)
    body = response.json()
    assert response.status_code == 422
    assert {e["field"] for e in body["errors"]} == {"texts[1]", "top_k"}
    malformed = post_raw(server, "/v1/classify", b"{", auth)
    assert malformed.status_code == 400 and malformed.json()["errors"] == []


def test_service_page_sends_security_headers(server):
    response = requests.get(f"{server.url}/", timeout=5)
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "no-referrer"


def test_service_request_id_is_echoed_or_made(server, auth):
    kept = post(server, "/v1/classify", {"text": "hi"}, {**auth, "X-Request-ID": "abc-123"})
    assert kept.headers["X-Request-ID"] == "abc-123"
    replaced = requests.get(
        f"{server.url}/livez", headers={"X-Request-ID": "bad id\twith spaces"}, timeout=5
    )
    made = replaced.headers["X-Request-ID"]
    assert made != "bad id\twith spaces" and len(made) == 32
    time.sleep(0.5)
    assert "[abc-123]" in server.log_path.read_text(errors="replace")


def test_service_access_log_has_no_query_string(server, auth):
    secret = "do-not-log-me-1234"
    requests.post(
        f"{server.url}/v1/classify?api_key={secret}",
        json={"text": "hi"},
        headers={"X-Request-ID": "query-probe"},
        timeout=10,
    )
    time.sleep(0.5)
    log = server.log_path.read_text(errors="replace")
    assert "[query-probe]" in log and "POST /v1/classify 401" in log
    assert secret not in log
    assert API_KEY not in log


def test_service_models_and_health_answer_their_schemas(server, auth):
    models = requests.get(f"{server.url}/v1/models", headers=auth, timeout=5).json()
    assert set(models) == {"models", "default_attribution", "explain"}
    assert json.loads(requests.get(f"{server.url}/health", timeout=5).text) == {"status": "ready"}
