"""`elision serve --address` on a two-node Ray cluster (both nodes on this machine, 1 CPU each), over real HTTP.

One cluster and one service for the whole module (a Ray start is the slow part): greedy answers equal `elision run`
token for token (streaming and not), every bad request is a 400 with a JSON error, a full queue answers 503 with
Retry-After, a client that disconnects stops its generation, a replica killed under load loses no request, and
stopping the command removes the application but leaves the cluster it joined running.
"""
from __future__ import annotations

import threading
import time

import pytest

ray = pytest.importorskip("ray", reason="the serve extra is not installed: pip install 'elision[serve]'")
pytest.importorskip("ray.serve", reason="the serve extra is not installed: pip install 'elision[serve]'")
requests = pytest.importorskip("requests")

from ray import serve  # noqa: E402
from serve_helpers import HOST, REQUEST_TIMEOUT_S, ServeProcess, elision_run, free_port, sse_events  # noqa: E402

from elision.apps.serve.service import APP_NAME, generator_replica_names, wait_replicas_running  # noqa: E402

PROMPTS = ["def parse(", "import os\n", "class Stack:\n    def push(self"]
MAX_QUEUED = 2
REPLICAS = 2
BATCH = 2  # requests a replica decodes together


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                       "object_store_memory": 128 << 20})
    c.add_node(num_cpus=1, object_store_memory=128 << 20)
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def service(cluster, served_artifact):
    port = free_port()
    proc = ServeProcess([str(served_artifact), "--address", cluster.address, "--host", HOST, "--port", str(port),
                         "--replicas", str(REPLICAS), "--replica-cpus", "0.5", "--max-queued", str(MAX_QUEUED),
                         "--max-batch-size", str(BATCH),
                         # both "nodes" are this machine: a proxy on each would bind the same port twice
                         "--proxy-location", "HeadOnly"])
    try:
        proc.start()
        yield proc, f"http://{HOST}:{port}"
    finally:
        proc.kill()


def post(url: str, body=None, **kw):
    return requests.post(f"{url}/v1/completions", timeout=REQUEST_TIMEOUT_S, **({"json": body} if body is not None else {}),
                         **kw)


def replica_stats(replicas: int = REPLICAS) -> dict[str, dict]:
    """Counters of every generator replica (a handle call lands on one replica; ask until all have answered)."""
    handle = serve.get_deployment_handle("generator", APP_NAME)
    seen: dict[str, dict] = {}
    for _ in range(50):
        s = handle.stats.remote().result(timeout_s=REQUEST_TIMEOUT_S)
        seen[s["replica"]] = s
        if len(seen) == replicas:
            break
    return seen


def test_models_and_health(service):
    proc, url = service
    assert "serving tiny-code-lm" in proc.banner and "2 replicas" in proc.banner
    assert requests.get(f"{url}/healthz", timeout=30).json()["status"] == "ok"
    models = requests.get(f"{url}/v1/models", timeout=30).json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny-code-lm"]
    assert models["data"][0]["max_positions"] == 512


def test_replicas_spread_over_the_nodes(service):
    stats = replica_stats()
    assert len(stats) == REPLICAS
    assert len({s["node"] for s in stats.values()}) == 2, stats  # one replica per node
    assert all(s["threads"] == 1 for s in stats.values())  # 0.5 CPU each -> one ORT thread, not one per core


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_completion_equals_elision_run(service, served_artifact, prompt):
    _, url = service
    want = elision_run(served_artifact, prompt, 40)
    r = post(url, {"prompt": prompt, "max_tokens": 40, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny-code-lm"
    assert body["elision"]["tokens"] == want["tokens"]
    assert body["choices"][0]["text"] == want["text"]
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == len(want["tokens"]) == 40
    assert body["usage"]["prompt_tokens"] + 40 == body["usage"]["total_tokens"]
    assert set(body["elision"]["stats"]) == set(want["stats"])  # the statistics of `elision run --json`
    assert body["elision"]["stats"]["new_tokens"] == 40


def test_streamed_completion_equals_elision_run(service, served_artifact):
    _, url = service
    prompt = PROMPTS[0]
    want = elision_run(served_artifact, prompt, 64)
    with post(url, {"prompt": prompt, "max_tokens": 64, "temperature": 0, "stream": True}, stream=True) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len(chunks) > 2  # text arrives step by step, not in one piece at the end
    assert all(c["id"] == chunks[0]["id"] for c in chunks)
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["text"] for c in chunks) == want["text"]
    assert last["elision"]["tokens"] == want["tokens"]
    assert last["usage"]["completion_tokens"] == 64


def test_stop_strings_end_the_text_before_them(service, served_artifact):
    _, url = service
    prompt = "def parse(text):\n"
    full = elision_run(served_artifact, prompt, 60)["text"]
    stop = "\n"
    assert stop in full  # otherwise this test checks nothing
    want = elision_run(served_artifact, prompt, 60, stop=[stop])
    r = post(url, {"prompt": prompt, "max_tokens": 60, "temperature": 0, "stop": [stop]})
    body = r.json()
    assert body["elision"]["tokens"] == want["tokens"]  # generation stopped where `elision run --stop` stops
    assert body["choices"][0]["text"] == full[: full.index(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"
    with post(url, {"prompt": prompt, "max_tokens": 60, "temperature": 0, "stop": stop, "stream": True},
              stream=True) as s:
        events = sse_events(s)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == full[: full.index(stop)]
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_sampling_requests_are_served(service):
    _, url = service
    r = post(url, {"prompt": PROMPTS[1], "max_tokens": 24, "temperature": 0.8, "top_p": 0.9, "seed": 7})
    assert r.status_code == 200, r.text
    body = r.json()
    assert 1 <= len(body["elision"]["tokens"]) <= 24
    assert body["elision"]["stats"]["new_tokens"] == len(body["elision"]["tokens"])


@pytest.mark.parametrize("body, says", [
    (b"{\"prompt\": \"x\",", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b"\xff\xfe{}", "not valid UTF-8"),
    (b"{\"prompt\": \"\\ud800\"}", "lone surrogate"),
    (b"{\"max_tokens\": 5}", "prompt"),
])
def test_unreadable_bodies_get_a_json_error(service, body, says):
    _, url = service
    r = post(url, data=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and says in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("fields, status, says", [
    ({"n": 2}, 400, "unknown field 'n'"),
    ({"max_tokens": "5"}, 400, "max_tokens"),
    ({"max_tokens": 0}, 400, "max_tokens must be >= 1"),
    ({"max_tokens": -3}, 400, "max_tokens must be >= 1"),
    ({"max_tokens": 100000}, 400, "over the model's limit"),
    ({"temperature": 5}, 400, "temperature"),
    ({"model": "gpt-4"}, 404, "not served here"),
])
def test_bad_fields_get_a_json_error(service, fields, status, says):
    _, url = service
    r = post(url, {"prompt": "x", **fields})
    assert r.status_code == status and says in r.json()["error"]["message"], r.text


def test_prompts_over_the_position_limit_are_refused(service):
    _, url = service
    long_prompt = "x = 1\n" * 400  # well over 512 tokens
    for stream in (False, True):  # a streaming request is refused before any event, with the same JSON error
        r = post(url, {"prompt": long_prompt, "max_tokens": 4, "stream": stream})
        assert r.status_code == 400 and "over the model's position limit of 512" in r.json()["error"]["message"]
    r = post(url, {"prompt": "x = 1\n" * 60, "max_tokens": 500})
    assert r.status_code == 400 and "lower max_tokens to at most" in r.json()["error"]["message"]


def test_a_full_queue_answers_503_with_retry_after(service):
    _, url = service
    n = 14  # capacity: 2 replicas x a batch of 2 + MAX_QUEUED waiting; the rest must be refused, not queued
    results: list = [None] * n

    def client(i):
        try:
            results[i] = post(url, {"prompt": PROMPTS[1], "max_tokens": 200, "temperature": 0})
        except requests.RequestException as e:
            results[i] = e

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=REQUEST_TIMEOUT_S)
    assert not any(t.is_alive() for t in threads)
    codes = [r.status_code for r in results]
    assert set(codes) <= {200, 503} and codes.count(200) >= 1 and codes.count(503) >= n - REPLICAS * BATCH - MAX_QUEUED - 2
    for r in results:
        if r.status_code == 503:
            assert r.headers["Retry-After"] == "1" and r.json()["error"]["message"]
        else:
            assert len(r.json()["elision"]["tokens"]) == 200


def test_a_client_disconnect_cancels_its_generation(service):
    _, url = service
    before = sum(s.get("cancelled", 0) for s in replica_stats().values())
    r = post(url, {"prompt": PROMPTS[1], "max_tokens": 480, "temperature": 0, "stream": True}, stream=True)
    first = next(r.iter_lines())
    assert first.startswith(b"data: ")
    r.close()  # the client goes away after its first piece of text
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        stats = replica_stats()
        if sum(s.get("cancelled", 0) for s in stats.values()) > before:
            break
        time.sleep(0.5)
    cancelled = [s for s in stats.values() if s.get("cancelled", 0)]
    assert sum(s.get("cancelled", 0) for s in stats.values()) == before + 1
    # stopped between steps, long before its 480 tokens (a full generation here takes > 100 steps)
    assert all(s["cancelled_steps"] < 100 for s in cancelled)


def test_killing_a_replica_under_load_loses_no_request(service):
    """Three clients keep both replicas busy; one replica is killed mid-load. Requests on it are retried on the
    other replica when nothing was sent yet, or end with a clear error; none hangs, every one is counted, and the
    service returns to two serving replicas. Clients do what a 503 + Retry-After asks (capacity halves while the
    replica is replaced): wait and send again, a bounded number of times."""
    _, url = service
    per_client, clients = 5, 3
    outcomes: list[tuple] = []
    lock = threading.Lock()

    def client(i):
        stream = i == 1
        for _ in range(per_client):
            body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 120, "temperature": 0, "stream": stream}
            try:
                for _attempt in range(20):
                    r = post(url, body, stream=stream)
                    if r.status_code != 503 or "Retry-After" not in r.headers:
                        break
                    time.sleep(float(r.headers["Retry-After"]))
                if r.status_code != 200:
                    outcome = ("errored", r.status_code, r.json()["error"]["message"])
                elif stream:
                    events = sse_events(r)
                    errors = [e["error"]["message"] for e in events if isinstance(e, dict) and "error" in e]
                    done = events[-1] == "[DONE]" and "elision" in events[-2]
                    outcome = ("answered", 200, "") if done else ("errored", 200, errors[0]) if errors else \
                        ("garbled", 200, str(events[-3:]))
                else:
                    tokens = r.json()["elision"]["tokens"]
                    outcome = ("answered", 200, "") if len(tokens) == 120 else ("garbled", 200, str(tokens))
            except requests.RequestException as e:  # a hang ends here (timeout) and fails the test below
                outcome = ("lost", None, repr(e))
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(outcomes) < 2 and time.monotonic() < deadline:  # the load is on
        time.sleep(0.1)
    before = generator_replica_names()
    victim = before[0]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    for t in threads:
        t.join(timeout=per_client * REQUEST_TIMEOUT_S)
    assert not any(t.is_alive() for t in threads), "a request hung"
    assert len(outcomes) == per_client * clients  # every request sent got an answer or an error
    kinds = [k for k, _, _ in outcomes]
    assert kinds.count("answered") + kinds.count("errored") == len(outcomes), outcomes
    assert all(message for kind, _, message in outcomes if kind == "errored"), outcomes  # errors say what happened
    errors = [o for o in outcomes if o[0] != "answered"]
    assert len(errors) <= clients, errors  # at most the in-flight ones fail
    # the controller replaces the replica and both replicas serve again
    assert wait_replicas_running(REPLICAS, timeout_s=120, replacing=before)
    assert victim not in generator_replica_names()
    serving = set()
    for _ in range(30):
        serving.add(post(url, {"prompt": "x", "max_tokens": 4, "temperature": 0}).json()["elision"]["replica"])
        if len(serving) == REPLICAS:
            break
    assert len(serving) == REPLICAS and victim.rsplit("#", 1)[1] not in serving


def test_stopping_the_command_removes_the_app_and_leaves_the_cluster(service, cluster):
    proc, _ = service
    code, out, err = proc.stop()
    assert code == 0, err[-2000:]
    assert "stopped" in out
    assert APP_NAME not in serve.status().applications
    assert ray.cluster_resources().get("CPU") == 2  # the cluster it joined is still there
