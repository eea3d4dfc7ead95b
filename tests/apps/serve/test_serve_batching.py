"""Continuous batching in the generator replicas, over real HTTP on a local Ray (one replica of 1 CPU, batches of 3).

* Greedy requests sent concurrently at drawn moments (hypothesis: any interleaving; streaming or not, with or
  without a stop string) get exactly `elision run`'s tokens and text, and they really shared decoding steps.
* A cancelled request (its client disconnects) frees its row at once: a new request runs while the batch's other
  requests still decode.
* A bad request among running ones fails alone with 400 (the front's checks, and the replica's own), the others
  finish with their exact answers; sampled requests with their own options are served beside greedy ones.
"""
from __future__ import annotations

import functools
import threading
import time

import pytest

pytest.importorskip("ray.serve", reason="the serve extra is not installed: pip install 'elision[serve]'")
requests = pytest.importorskip("requests")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from serve_helpers import HOST, REQUEST_TIMEOUT_S, START_TIMEOUT_S, elision_run, free_port, sse_events  # noqa: E402

from elision.apps.serve.service import ServeOptions, Service  # noqa: E402

PROMPTS = ["def parse(", "import os\n", "class Stack:\n    def push(self", "def parse(text):\n"]
BATCH = 3


@pytest.fixture(scope="module")
def service(served_artifact):
    svc = Service(served_artifact, ServeOptions(replicas=1, host=HOST, port=free_port(), ray_cpus=2, replica_cpus=1,
                                                max_batch_size=BATCH, max_queued=16))
    svc.start()
    try:
        assert svc.wait_replicas_running(START_TIMEOUT_S)
        yield svc
    finally:
        svc.shutdown()


@functools.lru_cache(maxsize=None)
def reference(artifact, prompt: str, max_tokens: int, stop: str | None) -> dict:
    return elision_run(artifact, prompt, max_tokens, stop=[stop] if stop else None)


def replica_stats(svc) -> dict:
    return svc.generator_handle().stats.remote().result(timeout_s=REQUEST_TIMEOUT_S)


def completion(url: str, body: dict) -> dict:
    """{tokens, text} of one request, streamed or not (the text as the client sees it, stop strings cut)."""
    r = requests.post(f"{url}/v1/completions", json=body, timeout=REQUEST_TIMEOUT_S, stream=body.get("stream", False))
    assert r.status_code == 200, r.text
    if body.get("stream"):
        events = sse_events(r)
        assert events[-1] == "[DONE]"
        return {"tokens": events[-2]["elision"]["tokens"], "text": "".join(e["choices"][0]["text"] for e in events[:-1])}
    body = r.json()
    return {"tokens": body["elision"]["tokens"], "text": body["choices"][0]["text"]}


request_strategy = st.fixed_dictionaries({
    "prompt": st.sampled_from(PROMPTS), "max_tokens": st.sampled_from([6, 24, 48]), "stream": st.booleans(),
    "stop": st.sampled_from([None, None, "\n"]), "delay_s": st.sampled_from([0.0, 0.0, 0.05, 0.2, 0.5])})


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
          phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(plan=st.lists(request_strategy, min_size=2, max_size=6))
def test_concurrent_greedy_requests_equal_elision_run(service, served_artifact, plan):
    results: list = [None] * len(plan)

    def client(i, req):
        time.sleep(req["delay_s"])
        body = {"prompt": req["prompt"], "max_tokens": req["max_tokens"], "temperature": 0, "stream": req["stream"]}
        if req["stop"]:
            body["stop"] = req["stop"]
        results[i] = completion(service.url, body)

    threads = [threading.Thread(target=client, args=(i, req)) for i, req in enumerate(plan)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=REQUEST_TIMEOUT_S)
    assert not any(t.is_alive() for t in threads)
    for req, got in zip(plan, results):
        want = reference(served_artifact, req["prompt"], req["max_tokens"], req["stop"])
        assert got["tokens"] == want["tokens"], req
        full = want["text"]
        assert got["text"] == (full[: full.index(req["stop"])] if req["stop"] and req["stop"] in full else full), req


def test_requests_really_share_steps(service, served_artifact):
    """Three long requests at once: the replica decodes them in one batch (its high-water mark says so)."""
    want = reference(served_artifact, PROMPTS[1], 120, None)
    out: list = [None] * BATCH
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, completion(
        service.url, {"prompt": PROMPTS[1], "max_tokens": 120, "temperature": 0}))) for i in range(BATCH)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=REQUEST_TIMEOUT_S)
    assert all(o["tokens"] == want["tokens"] for o in out)
    stats = replica_stats(service)
    assert stats["max_batch_size"] == BATCH and stats["max_running"] == BATCH, stats


def test_a_cancelled_request_frees_its_row(service, served_artifact):
    url = service.url
    before = replica_stats(service)
    streams = [requests.post(f"{url}/v1/completions", json={"prompt": p, "max_tokens": 480, "temperature": 0,
                                                             "stream": True}, stream=True, timeout=REQUEST_TIMEOUT_S)
               for p in PROMPTS[:BATCH]]
    try:
        lines = [s.iter_lines() for s in streams]
        for it in lines:  # every row of the batch is taken and decoding
            assert next(it).startswith(b"data: ")
        streams[0].close()  # one client goes away
        want = reference(served_artifact, PROMPTS[3], 8, None)
        got = completion(url, {"prompt": PROMPTS[3], "max_tokens": 8, "temperature": 0})
        stats = replica_stats(service)
        # the new request ran in the freed row while both other long requests were still decoding
        assert got["tokens"] == want["tokens"]
        assert stats["running"] == BATCH - 1, stats
        assert stats.get("cancelled", 0) == before.get("cancelled", 0) + 1
    finally:
        for s in streams:
            s.close()
    deadline = time.monotonic() + 60
    while replica_stats(service)["running"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert replica_stats(service)["running"] == 0  # the other two were cancelled too, nothing leaks


def test_a_bad_request_in_a_batch_fails_alone(service, served_artifact):
    from ray.serve.handle import DeploymentHandle

    url = service.url
    want = reference(served_artifact, PROMPTS[2], 64, None)
    good: list = [None, None]
    threads = [threading.Thread(target=lambda i=i: good.__setitem__(i, completion(
        url, {"prompt": PROMPTS[2], "max_tokens": 64, "temperature": 0}))) for i in range(2)]
    sampled: dict = {}
    sampler = threading.Thread(target=lambda: sampled.update(requests.post(f"{url}/v1/completions", json={
        "prompt": PROMPTS[0], "max_tokens": 20, "temperature": 0.7, "top_p": 0.8, "seed": 3},
        timeout=REQUEST_TIMEOUT_S).json()))
    for t in threads + [sampler]:
        t.start()
    time.sleep(0.3)  # the good ones are decoding
    r = requests.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 0}, timeout=REQUEST_TIMEOUT_S)
    assert r.status_code == 400 and "max_tokens must be >= 1" in r.json()["error"]["message"]
    # past the front's checks, straight to the replica: token ids outside the vocabulary
    handle: DeploymentHandle = service.generator_handle().options(stream=True)
    job = {"prompt_ids": [10**6], "max_new_tokens": 4, "stream": False, "options": {}}
    events = list(handle.generate.remote(job))
    assert events[0][0] == "error" and events[0][1]["status"] == 400, events
    assert "outside the vocabulary" in events[0][1]["message"]
    for t in threads + [sampler]:
        t.join(timeout=REQUEST_TIMEOUT_S)
    assert [g["tokens"] for g in good] == [want["tokens"]] * 2
    assert 1 <= len(sampled["elision"]["tokens"]) <= 20
    assert replica_stats(service).get("refused", 0) >= 1


def test_batching_options_are_checked(served_artifact):
    from typer.testing import CliRunner

    from elision.cli.main import app

    for args, says in [(["--max-batch-size", "0"], "--max-batch-size must be >= 1"),
                       (["--batch-wait-ms", "-1"], "--batch-wait-ms must be in 0..10000")]:
        res = CliRunner().invoke(app, ["serve", str(served_artifact), *args])
        assert res.exit_code == 2 and says in res.output, res.output
