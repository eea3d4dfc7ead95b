"""The generator replica: one `OrtGenerator` per Ray Serve replica, loaded once, serving one batch at a time.

A generation's KV cache lives in the replica and the generator is stateful (recycling drafter, cost curve), so every
generation runs whole inside one request, and a replica runs one batch of generations at a time
(`max_concurrent_batches=1`; the deployment's `max_ongoing_requests` is `MAX_BATCH_SIZE`, so the router only sends
a replica what it can take and the rest waits, bounded, in the caller's queue).

Dynamic batching plugs in at one place, `_run_batch`: Ray Serve's `@serve.batch` collects the queued requests into
one list. `MAX_BATCH_SIZE` is 1 until `OrtGenerator.generate_batch` (elision's batch > 1 loop) is available; then
`_run_batch` hands the whole list to it in one call (see the comment there).
"""
from __future__ import annotations

import asyncio
import logging
from collections import Counter

import ray
from ray import serve

from elision.apps.serve.job import GenerationCancelled, Job
from elision.runtime.generation.ort_generator import GenerationError, OrtGenerator

MAX_BATCH_SIZE = 1   # generations one replica runs at once; raise with OrtGenerator.generate_batch
BATCH_WAIT_S = 0.0   # with batches > 1: how long the first queued request waits for company
WARMUP_TOKENS = 8    # a first generation at start-up measures the dynamic tree's verification-cost curve

log = logging.getLogger("ray.serve")


def assigned_threads() -> int:
    """ORT intra-op threads for this replica: the whole CPUs Ray assigned it (at least 1). Ray sets
    OMP_NUM_THREADS for its workers, but the onnxruntime wheel does not read it, so without this every replica
    would start one thread per core of the node and replicas would oversubscribe it."""
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, int(cpus))


class GeneratorReplica:
    def __init__(self, artifact_dir: str):
        self.threads = assigned_threads()
        self.generator = OrtGenerator.load(artifact_dir, threads=self.threads)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.counters: Counter[str] = Counter()
        self.generator.generate([self.generator.eos_token_ids[0] if self.generator.eos_token_ids else 0],
                                WARMUP_TOKENS, eos_token_id=[])

    async def generate(self, request: dict):
        """Stream the events of one generation: ("text", piece)*, then ("done", result) or ("error", {status,
        message}). Cancelling the call (the client went away) stops the generation at its next step."""
        job = Job(request, asyncio.get_running_loop())
        submitted = asyncio.ensure_future(self._submit(job))
        try:
            while True:
                kind, payload = await job.events.get()
                yield kind, payload
                if kind in ("done", "error"):
                    return
        finally:
            job.cancelled.set()  # a no-op once the generation is over
            if not submitted.done():
                submitted.add_done_callback(lambda f: f.cancelled() or f.exception())  # outlives the request

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_S, max_concurrent_batches=1)
    async def _submit(self, jobs: list[Job]) -> list[None]:
        try:
            await asyncio.to_thread(self._run_batch, jobs)
        except Exception as e:  # noqa: BLE001 - a waiting request must get an answer, never hang
            log.exception("generation batch failed")
            for job in jobs:  # a job that already ended ignores a further event
                job.emit("error", {"status": 500, "message": f"generation failed: {type(e).__name__}: {e}".splitlines()[0]})
        return [None] * len(jobs)

    def _run_batch(self, jobs: list[Job]) -> None:
        """Run the queued requests `jobs` (in a worker thread), reporting through each job's events.

        This is where batching plugs in. With `MAX_BATCH_SIZE > 1` the live jobs go to elision's batch loop in
        one call, `self.generator.generate_batch([j.request["prompt_ids"] for j in live], max_new_tokens=...,
        **options)` (one `OrtGenerationResult` per job), with per-row streaming/cancellation through each job's
        `on_text`; jobs with different sampling options are split into separate batches. Until then a batch
        holds one request.
        """
        live = [j for j in jobs if not j.cancelled.is_set()]
        self.counters["cancelled_before_start"] += len(jobs) - len(live)
        if len(live) > 1:
            raise RuntimeError(f"a batch of {len(live)} generations needs OrtGenerator.generate_batch; "
                               f"MAX_BATCH_SIZE must stay 1 without it")
        if live:
            self._run_one(live[0])

    def _run_one(self, job: Job) -> None:
        r = job.request
        try:
            result = self.generator.generate(r["prompt_ids"], r["max_new_tokens"], stream=job.on_text, **r["options"])
        except GenerationCancelled:
            self.counters["cancelled"] += 1
            self.counters["cancelled_steps"] += job.steps
            return
        except GenerationError as e:  # the front checks requests first; this is the replica's own check
            self.counters["refused"] += 1
            job.emit("error", {"status": 400, "message": str(e)})
            return
        except Exception as e:  # noqa: BLE001 - a bug must fail this request, not the replica
            log.exception("generation failed")
            self.counters["failed"] += 1
            job.emit("error", {"status": 500, "message": f"generation failed: {type(e).__name__}: {e}".splitlines()[0]})
            return
        self.counters["completed"] += 1
        self.counters["tokens"] += len(result.tokens)
        job.emit("done", {"tokens": result.tokens, "text": result.text, "stats": result.stats,
                          "prompt_tokens": len(result.prompt), "replica": self.replica_id})

    def stats(self) -> dict:
        """Counters of this replica (completed, cancelled, refused, failed generations; tokens), its node and settings."""
        return {"replica": self.replica_id, "node": ray.get_runtime_context().get_node_id(), "threads": self.threads,
                "max_batch_size": MAX_BATCH_SIZE, **self.counters}
