"""The HTTP API end to end: every route, every bad input, auth, limits, timeouts, metrics."""

from __future__ import annotations

import math
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from service.config import Settings
from tests.integration.conftest import API_KEY, INTENTS, model_workers

pytestmark = pytest.mark.integration

MESSAGES = [
    "I lost my card yesterday, please block it",
    "Why did my transfer fail?",
    "refund",
    "How do I top up with Apple Pay?",
    "My card payment was declined twice today!!",
]
CONVERSATION = (
    "#Person1#: Hello, I can't find my card anywhere.\n"
    "#Person2#: I'm sorry to hear that. I can block it for you right now.\n"
    "#Person1#: Yes please, and send me a new one.\n"
    "#Person2#: Done. The new card will arrive in five days."
)


def post(server, path, body, headers, **kwargs):
    return requests.post(f"{server.url}{path}", json=body, headers=headers, timeout=30, **kwargs)


def test_service_probes_and_page_are_open_without_key(server):
    assert requests.get(f"{server.url}/health", timeout=5).status_code == 200
    assert requests.get(f"{server.url}/livez", timeout=5).json() == {"status": "alive"}
    metrics = requests.get(f"{server.url}/metrics", timeout=5)
    assert metrics.status_code == 200 and "supportlens_http_requests_total" in metrics.text
    page = requests.get(f"{server.url}/", timeout=5)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="classify-form"' in page.text
    assert requests.get(f"{server.url}/static/app.js", timeout=5).status_code == 200


def test_service_openapi_has_real_schemas(server):
    spec = requests.get(f"{server.url}/openapi.json", timeout=5).json()
    schemas = spec["components"]["schemas"]
    assert {"ClassifyRequest", "ClassifyResponse", "SummarizeRequest", "SummarizeResponse"} <= set(
        schemas
    )
    assert {"texts", "top_k", "explain"} <= set(schemas["ClassifyRequest"]["properties"])
    assert {"label", "score", "top_k", "truncated", "explanations"} <= set(
        schemas["ClassifyResult"]["properties"]
    )
    classify = spec["paths"]["/v1/classify"]["post"]
    assert classify["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ClassifyRequest"
    )
    ok = classify["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok["$ref"].endswith("/ClassifyResponse")
    assert {"401", "413", "422", "429"} <= set(classify["responses"])
    assert "/v1/classify/explain" not in spec["paths"]  # internal worker pool, not a route


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"X-API-Key": API_KEY[:-1]},
        {"Authorization": API_KEY},
    ],
)
def test_service_rejects_missing_or_wrong_key(server, headers):
    for path in ("/v1/classify", "/v1/summarize", "/v1/models"):
        response = requests.post(
            f"{server.url}{path}", json={"texts": ["hi"]}, headers=headers, timeout=10
        )
        assert response.status_code == 401, path
        assert "API key" in response.json()["detail"]


def test_service_accepts_bearer_and_x_api_key(server):
    for headers in ({"Authorization": f"Bearer {API_KEY}"}, {"X-API-Key": API_KEY}):
        assert post(server, "/v1/classify", {"text": "lost card"}, headers).status_code == 200


def test_service_classify_answers_in_request_order(server, auth):
    batch = post(server, "/v1/classify", {"texts": MESSAGES, "top_k": 3}, auth)
    assert batch.status_code == 200
    body = batch.json()
    assert body["model"]["name"] == "tiny-intent" and len(body["model"]["version"]) == 12
    results = body["results"]
    assert len(results) == len(MESSAGES)
    for text, result in zip(MESSAGES, results, strict=True):
        assert result["label"] in [*INTENTS, "out_of_scope"]
        scores = [entry["score"] for entry in result["top_k"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)
        assert all(0.0 <= s <= 1.0 for s in scores)
        assert result["truncated"] is False and result["explanations"] == {}
        # Each text alone gets the same answer: results are not shuffled by batching.
        alone = post(server, "/v1/classify", {"text": text, "top_k": 3}, auth).json()["results"][0]
        assert alone["top_k"][0]["label"] == result["top_k"][0]["label"]
        assert alone["score"] == pytest.approx(result["score"], abs=1e-5)
        # The bundle's k-NN detector scores every text (1 - cosine to a neighbour).
        assert 0.0 <= result["ood_score"] <= 2.0 and result["out_of_scope"] is False
        assert alone["ood_score"] == pytest.approx(result["ood_score"], abs=1e-4)


def test_service_classify_explanations_point_into_the_text(server, auth):
    methods = ["attention", "integrated_gradients"]
    response = post(server, "/v1/classify", {"texts": MESSAGES[:2], "explain": methods}, auth)
    assert response.status_code == 200
    for text, result in zip(MESSAGES[:2], response.json()["results"], strict=True):
        assert list(result["explanations"]) == methods
        for method in methods:
            words = result["explanations"][method]["words"]
            assert words and all(text[w["start"] : w["end"]] == w["text"] for w in words)
        attention = [w["score"] for w in result["explanations"]["attention"]["words"]]
        assert all(s >= 0 for s in attention) and sum(attention) == pytest.approx(1.0, abs=1e-3)
        assert "delta" in result["explanations"]["integrated_gradients"]


def test_service_truncates_long_text_and_says_so(server, auth):
    long_text = "my card payment was declined " * 40  # far over the 64-token limit
    response = post(server, "/v1/classify", {"texts": [long_text, "refund"]}, auth)
    assert response.status_code == 200
    assert [r["truncated"] for r in response.json()["results"]] == [True, False]


def test_service_summarize_selects_sentences_of_the_conversation(server, auth):
    response = post(
        server,
        "/v1/summarize",
        {
            "texts": [CONVERSATION, "Short note. Nothing else."],
            "max_sentences": 2,
            "explain": ["attention"],
        },
        auth,
    )
    assert response.status_code == 200
    results = response.json()["results"]
    assert len(results) == 2
    for text, result in zip([CONVERSATION, "Short note. Nothing else."], results, strict=True):
        selected = [s for s in result["sentences"] if s["selected"]]
        assert 1 <= len(selected) <= 2
        assert all(text[s["start"] : s["end"]] == s["text"] for s in result["sentences"])
        assert all(s["text"] in result["summary"] for s in selected)
        assert "attention" in result["explanations"]


BAD_INPUTS = [
    # (path, raw body or JSON, status, words the message must contain)
    ("/v1/classify", b'{"texts": ["unclosed"', 400, "JSON"),
    ("/v1/classify", {}, 422, "texts"),
    ("/v1/classify", {"texts": "not a list"}, 422, "texts"),
    ("/v1/classify", {"texts": []}, 422, "texts"),
    ("/v1/classify", {"texts": ["fine", "   \n"]}, 422, "texts[1]"),
    ("/v1/classify", {"texts": ["fine", 42]}, 422, "texts[1]"),
    ("/v1/classify", {"texts": ["x"] * 9}, 422, "texts"),
    ("/v1/classify", {"texts": ["x"], "top_k": 0}, 422, "top_k"),
    ("/v1/classify", {"texts": ["x"], "top_k": 5}, 422, "top_k"),  # more than the 4 intents
    ("/v1/classify", {"texts": ["x"], "top_k": "three"}, 422, "top_k"),
    ("/v1/classify", {"texts": ["x"], "explain": ["telepathy"]}, 422, "explain[0]"),
    ("/v1/classify", {"texts": ["x"], "explain": "attention"}, 422, "explain"),
    ("/v1/classify", {"texts": ["x"], "colour": "red"}, 422, "colour"),
    ("/v1/classify", [1, 2], 422, "body"),
    ("/v1/summarize", {"texts": ["..."], "max_sentences": 0}, 422, "max_sentences"),
    ("/v1/summarize", {"texts": [""]}, 422, "texts[0]"),
    ("/v1/summarize", {"texts": ["x"], "explain": ["integrated_gradients"]}, 422, "explain[0]"),
    ("/v1/classify", {"texts": ["x"], "target": "no_such_intent"}, 422, "target"),
    ("/v1/classify", {"texts": ["x"], "faithfulness": "yes"}, 422, "faithfulness"),
    ("/v1/summarize", {"texts": ["x"], "faithfulness": 1}, 422, "faithfulness"),
]


@pytest.mark.parametrize(("path", "body", "status", "field"), BAD_INPUTS)
def test_service_bad_input_gets_4xx_naming_the_field(server, auth, path, body, status, field):
    if isinstance(body, bytes):
        response = requests.post(
            f"{server.url}{path}",
            data=body,
            headers={**auth, "Content-Type": "application/json"},
            timeout=10,
        )
    else:
        response = post(server, path, body, auth)
    assert response.status_code == status, response.text
    assert field in response.json()["detail"]


def test_service_refuses_non_json_body_and_oversized_body(server, auth):
    form = requests.post(f"{server.url}/v1/classify", data={"texts": "x"}, headers=auth, timeout=10)
    assert form.status_code == 415 and "application/json" in form.json()["detail"]
    huge = {"texts": ["word " * 5000]}  # 25 kB > the 20 kB limit
    response = post(server, "/v1/classify", huge, auth)
    assert response.status_code == 413 and "20000 bytes" in response.json()["detail"]

    def chunks():  # no Content-Length: the limit applies while reading
        yield b'{"texts": ["'
        for _ in range(30):
            yield b"x" * 1000
        yield b'"]}'

    chunked = requests.post(
        f"{server.url}/v1/classify",
        data=chunks(),
        headers={**auth, "Content-Type": "application/json"},
        timeout=10,
    )
    assert chunked.status_code == 413


def test_service_bad_request_does_not_fail_its_batch_neighbours(server, auth):
    # An unexplainable text (no word) next to good ones in the same explanation batch.
    bodies = [{"texts": ["\u200b\u200b"], "explain": ["integrated_gradients"]}] + [
        {"texts": [m], "explain": ["integrated_gradients"]} for m in MESSAGES[:3]
    ]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: post(server, "/v1/classify", b, auth), bodies))
    assert responses[0].status_code == 422 and "texts" in responses[0].json()["detail"]
    assert [r.status_code for r in responses[1:]] == [200, 200, 200]


def test_service_burst_beyond_in_flight_limit_gets_429(server, auth):
    body = {"texts": MESSAGES, "top_k": 2}
    barrier = threading.Barrier(24)

    def fire(_):
        barrier.wait()
        return post(server, "/v1/classify", body, auth)

    with ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(fire, range(24)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}
    assert 200 in statuses and 429 in statuses
    rejected = next(r for r in responses if r.status_code == 429)
    assert int(rejected.headers["Retry-After"]) >= 1
    # Once the burst is over, the server answers normally again.
    assert post(server, "/v1/classify", body, auth).status_code == 200


def test_service_request_waiting_too_long_gets_504(server, auth):
    workers = model_workers(server.process.pid)
    assert len(workers) == 4  # classify (two), classify-explain, summarize
    for worker in workers:
        worker.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        response = post(server, "/v1/classify", {"text": "where is my card"}, auth)
        waited = time.monotonic() - started
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGCONT)
    assert response.status_code == 504 and "5 s" in response.json()["detail"]
    assert 4.5 < waited < 15
    assert post(server, "/v1/classify", {"text": "where is my card"}, auth).status_code == 200


def _samples(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_service_metrics_count_what_was_sent(server, auth):
    before = requests.get(f"{server.url}/metrics", timeout=5).text
    for _ in range(5):
        assert post(server, "/v1/classify", {"texts": MESSAGES[:2]}, auth).status_code == 200
    for _ in range(3):
        assert post(server, "/v1/classify", {"texts": []}, auth).status_code == 422
    assert post(server, "/v1/summarize", {"texts": [CONVERSATION]}, auth).status_code == 200
    after = requests.get(f"{server.url}/metrics", timeout=5).text

    def delta(name, **labels):
        return _samples(after, name, **labels) - _samples(before, name, **labels)

    requests_total = "supportlens_http_requests_total"
    assert delta(requests_total, route="/v1/classify", status="200") == 5
    assert delta(requests_total, route="/v1/classify", status="422") == 3
    assert delta(requests_total, route="/v1/summarize", status="200") == 1
    assert delta("supportlens_http_errors_total", route="/v1/classify", status="422") == 3
    assert delta("supportlens_http_request_duration_seconds_count", route="/v1/classify") == 8
    # Batch sizes are counted in the model workers: 2 texts per request, batched or not.
    assert delta("supportlens_batch_size_sum", api="/v1/classify") == 10
    assert 1 <= delta("supportlens_batch_size_count", api="/v1/classify") <= 5
    assert "supportlens_in_flight_requests" in after
    assert 'supportlens_queue_depth{api="/v1/classify"}' in after


def test_service_models_route_lists_models_and_methods(server, auth):
    body = requests.get(f"{server.url}/v1/models", headers=auth, timeout=5).json()
    assert body["models"]["classify"]["name"] == "tiny-intent"
    assert body["models"]["summarize"]["name"] == "tiny-summarizer"
    assert body["default_attribution"] in body["explain"]["classify"]


def test_service_runs_a_lone_request_on_every_core(server, auth):
    pool = Settings.from_env(server.env).core_pool()
    before = requests.get(f"{server.url}/metrics", timeout=5).text
    assert post(server, "/v1/classify", {"text": MESSAGES[0]}, auth).status_code == 200
    after = requests.get(f"{server.url}/metrics", timeout=5).text
    name, api = "supportlens_batch_threads", {"api": "/v1/classify"}
    assert _samples(after, f"{name}_count", **api) - _samples(before, f"{name}_count", **api) == 1
    assert _samples(after, f"{name}_sum", **api) - _samples(before, f"{name}_sum", **api) == pool


def test_service_workers_let_idle_threads_sleep_soon(server):
    # OpenMP threads left spinning would take the cores another worker was given; a
    # short spin (libgomp's GOMP_SPINCOUNT, read before OMP_WAIT_POLICY) keeps a forward
    # pass's threads awake between its operations.
    for worker in model_workers(server.process.pid):
        environ = worker.environ()
        assert environ.get("OMP_WAIT_POLICY") == "PASSIVE"
        assert environ.get("GOMP_SPINCOUNT") == "10000"


def test_service_processes_freeze_their_startup_heap_out_of_garbage_collection(server):
    # A full collection walks every object of a process; frozen at the end of start-up,
    # the hundreds of thousands that live as long as the process (torch, FastAPI, the
    # model) are skipped, so the event loop and the dispatch never stall on them.
    frozen = {
        role: int(count)
        for role, count in re.findall(
            r"(main process|HTTP process \d+|model worker [/\w-]+ \d+): (\d+) start-up objects frozen",
            server.log_path.read_text(errors="replace"),
        )
    }
    workers = Settings.from_env(server.env).classify_workers()
    expected = {"main process", "HTTP process 0", "HTTP process 1"} | {
        f"model worker /v1/classify {rank}" for rank in range(workers)
    }
    assert expected <= set(frozen), frozen
    assert min(frozen.values()) > 10_000  # the imported libraries, at least


def _probability(server, auth, texts, intent):
    """The calibrated probability of ``intent`` for each text, asked of the API itself."""
    response = post(server, "/v1/classify", {"texts": texts, "top_k": len(INTENTS)}, auth)
    assert response.status_code == 200, response.text
    return [
        next(e["score"] for e in r["top_k"] if e["label"] == intent)
        for r in response.json()["results"]
    ]


def _without(text, words):
    """``text`` with the characters of ``words`` deleted (done here, not by the service)."""
    gone = {c for w in words for c in range(w["start"], w["end"])}
    return "".join(ch for c, ch in enumerate(text) if c not in gone)


def test_service_faithfulness_equals_an_independent_recomputation(server, auth):
    texts = [MESSAGES[0], MESSAGES[4]]
    methods = ["attention", "occlusion", "gradient_x_input"]
    body = {"texts": texts, "explain": methods, "faithfulness": True}
    response = post(server, "/v1/classify", body, auth)
    assert response.status_code == 200, response.text
    for text, result in zip(texts, response.json()["results"], strict=True):
        for method in methods:
            explanation = result["explanations"][method]
            intent = explanation["intent"]
            assert intent == result["top_k"][0]["label"]  # the predicted intent by default
            words = explanation["words"]
            order = sorted(range(len(words)), key=lambda i: (-words[i]["score"], i))
            (full,) = _probability(server, auth, [text], intent)
            deleted, kept, sizes = [], [], []
            for fraction in (0.1, 0.2, 0.3, 0.4, 0.5):
                k = max(1, math.ceil(round(fraction * len(words), 9)))
                sizes.append(k)
                top = [words[i] for i in order[:k]]
                rest = [words[i] for i in order[k:]]
                deleted.append(_without(text, top))
                kept.append(_without(text, rest))
            p_deleted = _probability(server, auth, deleted, intent)
            p_kept = _probability(server, auth, kept, intent)
            measured = explanation["faithfulness"]
            assert [b["words"] for b in measured["bins"]] == sizes
            expected_comp = sum(full - p for p in p_deleted) / 5
            expected_suff = sum(full - p for p in p_kept) / 5
            assert measured["comprehensiveness"] == pytest.approx(expected_comp, abs=1e-4)
            assert measured["sufficiency"] == pytest.approx(expected_suff, abs=1e-4)


def test_service_explains_a_chosen_intent_and_the_contrast_of_the_top_two(server, auth):
    text = MESSAGES[1]
    plain = post(server, "/v1/classify", {"text": text, "top_k": 4}, auth).json()["results"][0]
    first, second = plain["top_k"][0]["label"], plain["top_k"][1]["label"]

    def occlusion(**options):
        body = {"text": text, "explain": ["occlusion", "attention"], **options}
        response = post(server, "/v1/classify", body, auth)
        assert response.status_code == 200, response.text
        return response.json()["results"][0]["explanations"]

    of_first, of_second = occlusion(target=first), occlusion(target=second)
    assert of_first["occlusion"]["intent"] == first and of_second["occlusion"]["intent"] == second
    contrast = occlusion(target="contrast", faithfulness=True)
    assert contrast["occlusion"]["intent"] == first
    assert contrast["occlusion"]["versus_intent"] == second
    # The margin's occlusion is the first intent's minus the second's, word by word.
    for margin, a, b in zip(
        contrast["occlusion"]["words"],
        of_first["occlusion"]["words"],
        of_second["occlusion"]["words"],
        strict=True,
    ):
        assert margin["score"] == pytest.approx(a["score"] - b["score"], abs=1e-4)
    # Attention does not depend on the class: the same words and scores for any target.
    assert of_first["attention"]["words"] == of_second["attention"]["words"]
    assert contrast["attention"]["faithfulness"]["bins"][0]["fraction"] == 0.1


def test_service_unknown_target_is_a_422_naming_it(server, auth):
    body = {"text": "refund", "explain": ["occlusion"], "target": "refund_statuss"}
    response = post(server, "/v1/classify", body, auth)
    assert response.status_code == 422
    answer = response.json()
    assert "refund_statuss" in answer["detail"]
    assert answer["errors"] and answer["errors"][0]["field"] == "target"
    assert "refund_statuss" in answer["errors"][0]["message"]


def test_service_summary_occlusion_and_selection_faithfulness(server, auth):
    conversation = "\n".join(CONVERSATION.splitlines()[:3])  # within the test's cost budget
    body = {
        "texts": [conversation],
        "max_sentences": 2,
        "explain": ["attention", "occlusion"],
        "faithfulness": True,
    }
    response = post(server, "/v1/summarize", body, auth)
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    explanations = result["explanations"]
    assert list(explanations) == ["unit_scores", "attention", "occlusion"]
    selected = [i for i, s in enumerate(result["sentences"]) if s["selected"]]
    occluded = explanations["occlusion"]["units"]
    assert [entry["unit"] for entry in occluded] == selected
    for entry in occluded:
        assert all(conversation[w["start"] : w["end"]] == w["text"] for w in entry["words"])
        assert {u["unit"] for u in entry["sentences"]} == set(range(len(result["sentences"]))) - {
            entry["unit"]
        }
    for method in ("attention", "occlusion"):
        measured = explanations[method]["faithfulness"]
        assert len(measured["bins"]) == 5
        assert -1.0 <= measured["comprehensiveness"] <= 1.0
    plain = post(server, "/v1/summarize", {"texts": [CONVERSATION]}, auth).json()
    assert list(plain["results"][0]["explanations"]) == ["unit_scores"]  # nothing else, no nulls


def test_service_faithfulness_runs_on_the_explanation_pool(server, auth):
    def count(api):
        text = requests.get(f"{server.url}/metrics", timeout=5).text
        return _samples(text, "supportlens_batch_size_count", api=api)

    before = (count("/v1/classify"), count("/v1/classify/explain"))
    body = {"text": MESSAGES[2], "explain": ["attention"], "faithfulness": True}
    response = post(server, "/v1/classify", body, auth)
    assert response.status_code == 200
    assert "faithfulness" in response.json()["results"][0]["explanations"]["attention"]
    # Only attention, which is free, yet the perturbed texts are work: the explanation pool.
    assert count("/v1/classify/explain") == before[1] + 1
    assert count("/v1/classify") == before[0]
