"""The HTTP service: shapes, errors, limits and auth through FastAPI's TestClient; the micro-batcher;
a real `potluck serve` process on a loopback port with concurrent clients and a graceful shutdown."""

import asyncio
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from serving_helpers import Server, tiny_model

from potluck.inference import Predictor
from potluck.serving.app import create_app
from potluck.serving.auth import KeyRing
from potluck.serving.batcher import MicroBatcher, in_thread
from potluck.serving.settings import ServeSettings

KEY = "a-long-enough-test-token-0123456789"


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_encoder):
    return [tiny_model(tmp_path_factory, tiny_encoder, name) for name in ("urgency", "intent")]


@pytest.fixture(scope="module")
def client(folders):
    settings = ServeSettings(precision="fp32", max_texts=8, max_chars=500, max_body_bytes=4096)
    with TestClient(create_app(folders[:1], settings)) as c:
        yield c


@pytest.fixture(scope="module")
def reference(folders):
    return Predictor.from_folder(folders[0], precision="fp32")


# -- shapes -----------------------------------------------------------------------------------------

def test_one_text_gives_one_ranked_list(client, reference):
    r = client.post("/v1/models/urgency/predict", json={"inputs": "server down now"})
    assert r.status_code == 200
    ranked = r.json()
    assert [set(p) for p in ranked] == [{"label", "score"}] * 2
    assert ranked[0]["score"] >= ranked[1]["score"] and abs(sum(p["score"] for p in ranked) - 1) < 1e-4
    probs = dict(zip(reference.labels, reference.predict_proba(["server down now"])[0], strict=True))
    assert all(abs(p["score"] - probs[p["label"]]) < 1e-5 for p in ranked)


def test_a_list_gives_a_list_of_lists_in_order(client, reference):
    texts = ["thanks great love", "server down outage now", "hello"]
    r = client.post("/predict", json={"inputs": texts})  # the only model also answers at /predict
    assert r.status_code == 200 and len(r.json()) == 3
    expected = reference.predict_proba(texts)
    for ranked, row in zip(r.json(), expected, strict=True):
        assert ranked[0]["label"] == reference.labels[int(row.argmax())]
    tei_style = client.post("/predict", json={"inputs": [[t] for t in texts]})  # TEI's [["a"], ["b"]]
    assert tei_style.json() == r.json()


def test_raw_scores_are_the_logits(client, reference):
    ranked = client.post("/predict", json={"inputs": "payment failed", "raw_scores": True}).json()
    logits = dict(zip(reference.labels, reference.logits(["payment failed"])[0], strict=True))
    assert all(abs(p["score"] - logits[p["label"]]) < 1e-4 for p in ranked)


def test_curl_style_form_content_type_is_read_as_json(client):
    r = client.post("/predict", content=b'{"inputs": "server down"}',
                    headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and len(r.json()) == 2


# -- errors and limits ------------------------------------------------------------------------------

@pytest.mark.parametrize("body,status,words", [
    (b'{"inputs": [}', 400, "malformed JSON"),
    (b"", 400, "empty request body"),
    (b'{"inputs": 3}', 422, "must be a text or a list of texts"),
    (b'{"inputs": []}', 422, "'inputs' is empty"),
    (b'{"text": "x"}', 422, "inputs: Field required"),
    (b'{"inputs": [["a", "b"]]}', 422, "pairs of texts are not supported"),
    (b'{"inputs": ["a","b","c","d","e","f","g","h","i"]}', 413, "9 texts in one request"),
    (b'{"inputs": "' + b"x" * 600 + b'"}', 413, "600 characters"),
    (b'{"inputs": "' + b"a " * 200 + b'", "truncate": false}', 422, "max_length"),
])
def test_mistakes_get_a_4xx_with_one_line(client, body, status, words):
    r = client.post("/v1/models/urgency/predict", content=body)
    assert r.status_code == status, r.text
    error = r.json()
    assert words in error["error"] and "\n" not in error["error"] and error["error_type"]


def test_truncate_true_cuts_long_texts(client):
    assert client.post("/predict", json={"inputs": "a " * 200, "truncate": True}).status_code == 200
    assert client.post("/predict", json={"inputs": "a " * 200}).status_code == 200  # --auto-truncate


def test_unknown_model_and_route(client):
    r = client.post("/v1/models/nope/predict", json={"inputs": "x"})
    assert r.status_code == 404 and r.json()["error"] == "unknown model 'nope'; loaded: urgency"
    assert client.get("/v1/models/urgency/predict").status_code == 405


def test_body_size_limit_by_header_and_by_stream(client):
    big = b'{"inputs": "' + b"a" * 5000 + b'"}'
    r = client.post("/predict", content=big)
    assert r.status_code == 413 and "4096 bytes" in r.json()["error"]

    def chunks():  # no Content-Length: the limit must hold while the body streams in
        for _ in range(10):
            yield b"a" * 1000
    r = client.post("/predict", content=chunks())
    assert r.status_code == 413


def test_two_models_get_a_route_each_and_no_default(folders):
    with TestClient(create_app(folders, ServeSettings(precision="fp32"))) as c:
        assert c.post("/v1/models/intent/predict", json={"inputs": "x"}).status_code == 200
        r = c.post("/predict", json={"inputs": "x"})
        assert r.status_code == 404 and "several models are loaded (urgency, intent)" in r.json()["error"]
        assert [m["name"] for m in c.get("/info").json()["models"]] == ["urgency", "intent"]


@pytest.mark.parametrize("processes", [True, False])
def test_model_processes_and_model_threads_give_the_same_answers(folders, reference, processes):
    texts = ["server down now", "thanks great love", "payment failed today"]
    with TestClient(create_app(folders, ServeSettings(precision="fp32", processes=processes))) as c:
        assert (c.app.state.processes is not None) == processes
        ranked = c.post("/v1/models/urgency/predict", json={"inputs": texts}).json()
    expected = reference.predict_proba(texts)
    for row, answer in zip(expected, ranked, strict=True):
        assert abs(answer[0]["score"] - row.max()) < 1e-5


# -- service routes ---------------------------------------------------------------------------------

def test_health_ready_info_docs(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json()["status"] == "ready"
    info = client.get("/info").json()
    model = info["models"][0]
    assert model["labels"] == ["calm", "urgent"] and model["precision"] == "fp32"
    assert "valid" in model["metrics"] and "temperature" in model["calibration"]
    assert info["limits"]["max_texts"] == 8 and info["auth"] is False
    paths = client.get("/openapi.json").json()["paths"]
    assert "requestBody" in paths["/v1/models/urgency/predict"]["post"]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "cdn" not in docs.text.lower()  # offline: the files come from the package
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert f"/static-offline-docs/{asset}" in docs.text
        assert client.get(f"/static-offline-docs/{asset}").status_code == 200


def test_metrics_count_requests_and_batches(client):
    client.post("/predict", json={"inputs": ["a", "b", "c"]})
    text = client.get("/metrics").text
    assert 'potluck_http_requests_total{code="200",method="POST",route="/predict"}' in text
    assert "potluck_http_request_duration_seconds_bucket" in text
    assert 'potluck_batch_texts_count{model="urgency"}' in text


def test_the_page_is_served(client):
    r = client.get("/")
    assert r.status_code == 200 and "<title>Potluck" in r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert client.get("/static/app.js").status_code == 200


# -- auth -------------------------------------------------------------------------------------------

def test_bearer_tokens(folders, tmp_path):
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(f"# the test client\n{KEY}\n\n")
    keys = KeyRing.from_file(keys_file)
    assert KEY not in repr(vars(keys))  # only digests are kept
    with TestClient(create_app(folders[:1], ServeSettings(precision="fp32"), keys=keys)) as c:
        for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": KEY}):
            r = c.post("/predict", json={"inputs": "x"}, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert "Authorization: Bearer" in r.json()["error"]
        ok = {"Authorization": f"Bearer {KEY}"}
        assert c.post("/predict", json={"inputs": "x"}, headers=ok).status_code == 200
        assert c.get("/info").status_code == 401 and c.get("/info", headers=ok).status_code == 200
        assert c.get("/metrics").status_code == 401
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200


def test_bad_key_files_are_user_errors(tmp_path):
    from potluck.errors import UserError

    (tmp_path / "short.txt").write_text("abc\n")
    with pytest.raises(UserError, match="line 1: a token must be at least 16"):
        KeyRing.from_file(tmp_path / "short.txt")
    with pytest.raises(UserError, match="no such API key file"):
        KeyRing.from_file(tmp_path / "missing.txt")


# -- the micro-batcher ------------------------------------------------------------------------------

def run_batcher(jobs, **kwargs):
    from concurrent.futures import ThreadPoolExecutor

    calls = []

    def run(ids):
        calls.append(len(ids))
        return np.array([[float(row[0]), -float(row[0])] for row in ids])

    async def main():
        batcher = MicroBatcher(in_thread(run, ThreadPoolExecutor(1)), **kwargs)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(job) for job in jobs))
        await batcher.stop()
        return results

    return asyncio.run(main()), calls


def test_batcher_gathers_concurrent_requests_and_keeps_each_ones_rows():
    jobs = [[[i], [i + 100]] for i in range(10)]
    results, calls = run_batcher(jobs, max_wait_ms=200, max_batch_texts=64)
    assert calls == [20]
    for i, logits in enumerate(results):
        assert logits[:, 0].tolist() == [i, i + 100]


def test_batcher_respects_the_budget():
    jobs = [[[i] * 10] for i in range(12)]
    _, calls = run_batcher(jobs, max_wait_ms=200, max_batch_texts=5, max_batch_tokens=10_000)
    assert sum(calls) == 12 and max(calls) <= 5
    _, calls = run_batcher(jobs, max_wait_ms=200, max_batch_texts=64, max_batch_tokens=30)
    assert max(calls) <= 3


def test_batcher_runs_up_to_max_in_flight_batches_at_once():
    """With two model threads, a second batch starts while the first runs, and every request is answered."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    both_running = threading.Barrier(2, timeout=10)  # passes only when two runs overlap
    sizes = []

    def run(ids):
        sizes.append(len(ids))
        if len(sizes) <= 2:
            both_running.wait()
        return np.array([[float(row[0]), 0.0] for row in ids])

    async def main():
        batcher = MicroBatcher(in_thread(run, ThreadPoolExecutor(2)), max_wait_ms=0, max_batch_texts=1, max_in_flight=2)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit([[i]]) for i in range(6)))
        await batcher.stop()
        return results

    results = asyncio.run(main())
    assert [r[0, 0] for r in results] == list(range(6)) and sizes == [1] * 6


def test_batcher_splits_the_waiting_texts_fairly_between_workers():
    """Eight requests waiting and two workers: two batches of four, not one of eight and an idle worker."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    both_running = threading.Barrier(2, timeout=10)
    sizes = []

    def run(ids):
        sizes.append(len(ids))
        both_running.wait()
        return np.zeros((len(ids), 2))

    async def main():
        batcher = MicroBatcher(in_thread(run, ThreadPoolExecutor(2)), max_wait_ms=1000, max_in_flight=2)
        batcher.start()
        # all eight are queued in one go, before the collector first looks
        await asyncio.gather(*(batcher.submit([[i]]) for i in range(8)))
        await batcher.stop()

    asyncio.run(main())
    assert sorted(sizes) == [4, 4]


def test_batcher_answers_a_lone_request_at_once():
    """An idle server has nothing to wait for: a single request runs without waiting max_wait_ms."""
    results, calls = [], []

    async def main():
        async def run(ids):
            calls.append(len(ids))
            return np.zeros((len(ids), 2))

        batcher = MicroBatcher(run, max_wait_ms=5000, max_in_flight=2)
        batcher.start()
        started = time.perf_counter()
        await batcher.submit([[1]])
        results.append(time.perf_counter() - started)
        await batcher.stop()

    asyncio.run(main())
    assert calls == [1] and results[0] < 1.0


def test_batcher_passes_a_model_error_to_each_request():
    from concurrent.futures import ThreadPoolExecutor

    def broken(ids):
        raise RuntimeError("boom")

    async def main():
        batcher = MicroBatcher(in_thread(broken, ThreadPoolExecutor(1)), max_wait_ms=50)
        batcher.start()
        results = await asyncio.gather(batcher.submit([[1]]), batcher.submit([[2]]), return_exceptions=True)
        await batcher.stop()
        return results

    assert [str(r) for r in asyncio.run(main())] == ["boom", "boom"]


# -- a real server ----------------------------------------------------------------------------------

@pytest.mark.timeout(180)
def test_real_server_with_concurrent_clients(folders, reference):
    texts = ["server down now", "thanks great love", "payment failed today", "hello there"]
    expected = reference.predict_proba(texts)

    async def client(http, i):
        answers = []
        for j in range(4):
            text = texts[(i + j) % len(texts)]
            r = await http.post("/v1/models/urgency/predict", json={"inputs": text})
            answers.append((text, r.status_code, r.json()))
        return answers

    async def main(url):
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            return await asyncio.wait_for(asyncio.gather(*(client(http, i) for i in range(16))), 60)

    with Server(*folders, "--precision", "fp32") as server:
        answers = [a for per_client in asyncio.run(main(server.url)) for a in per_client]
        metrics = httpx.get(server.url + "/metrics").text
    assert len(answers) == 64 and all(status == 200 for _, status, _ in answers)
    for text, _, ranked in answers:
        row = expected[texts.index(text)]
        assert abs(ranked[0]["score"] - row.max()) < 1e-4
    batches = [line for line in metrics.splitlines() if line.startswith('potluck_batch_texts_count{model="urgency"}')]
    assert batches and float(batches[0].split()[-1]) < 64 + 1  # gathered: fewer runs than requests (+ warm-up)


@pytest.mark.timeout(120)
def test_graceful_shutdown_finishes_requests_in_flight(folders):
    with Server(folders[0], "--precision", "fp32", "--max-wait-ms", "1000") as server:
        result = {}

        def call():
            result["response"] = httpx.post(server.url + "/predict", json={"inputs": "server down"}, timeout=30)

        thread = threading.Thread(target=call)
        thread.start()
        time.sleep(0.5)  # the request now waits in the batcher (max_wait_ms 1000)
        server.process.send_signal(signal.SIGTERM)
        thread.join(30)
        code = server.process.wait(30)
        output = server.output()
    assert result["response"].status_code == 200 and len(result["response"].json()) == 2
    assert code in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down cleanly
    assert "Traceback" not in output and "error" not in output.lower()


@pytest.mark.timeout(120)
def test_cli_mistakes_are_one_line(folders, tmp_path):
    def serve(*args):
        return subprocess.run([sys.executable, "-m", "potluck", "serve", *map(str, args)], capture_output=True,
                              text=True, timeout=90)

    r = serve(tmp_path / "missing")
    assert r.returncode == 2 and "no such model folder" in r.stderr and "Traceback" not in r.stderr
    r = serve(folders[0], "--max-texts", "0")
    assert r.returncode == 2 and "max_texts must be at least 1" in r.stderr
    with Server(folders[0]) as server:
        r = serve(folders[0], "--port", str(server.port))
    assert r.returncode == 2 and "cannot listen on 127.0.0.1" in r.stderr
