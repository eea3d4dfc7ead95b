"""The generator replica: one `OrtGenerator` per Ray Serve replica, decoding its requests with continuous batching.

Every request the replica holds runs in one batch (`elision.runtime.generation.continuous.ContinuousBatcher`),
driven by one generation thread (so the replica's event loop stays free for health checks and cancellations):

    loop: take the requests that arrived (into free rows; each prefilled alone) -> drop the cancelled ones
          -> one decoding step over every running request -> hand out the finished ones

A request that arrives while others decode joins at the next step instead of waiting for the batch to end, and one
that finishes or is cancelled frees its row at once. The deployment's `max_ongoing_requests` is the batch size
(`--max-batch-size`), so the router sends a replica only what fits in its batch and the rest waits, bounded, in the
caller's queue (then 503). `--batch-wait-ms` makes the first request reaching an idle replica wait that long for
company, so a burst starts as one batch (0 by default: a late request costs only its own prefill).

A bad request (one the replica's own checks refuse) gets its 400 alone; a failure inside a shared decoding step
fails the requests of that step with 500 and the replica goes on with the next ones.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from collections import Counter

import ray
from ray import serve

from elision.apps.serve.job import Job
from elision.runtime.generation.continuous import BatchRequest, ContinuousBatcher, Lane
from elision.runtime.generation.ort_generator import GenerationError, OrtGenerator

DEFAULT_MAX_BATCH_SIZE = 8  # requests one replica decodes together
WARMUP_TOKENS = 8           # a first generation at start-up, before the batch's cost curves are measured
IDLE_POLL_S = 0.5           # how often an idle generation thread looks whether the replica is stopping

log = logging.getLogger("ray.serve")


def assigned_threads() -> int:
    """ORT intra-op threads for this replica: the whole CPUs Ray assigned it (at least 1). Ray sets
    OMP_NUM_THREADS for its workers, but the onnxruntime wheel does not read it, so without this every replica
    would start one thread per core of the node and replicas would oversubscribe it."""
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, int(cpus))


def batch_request(job: Job) -> BatchRequest:
    r = job.request
    return BatchRequest(r["prompt_ids"], r["max_new_tokens"], on_text=job.on_text if r.get("stream") else None,
                        **r["options"])


def failure(e: BaseException) -> dict:
    return {"status": 500, "message": f"generation failed: {type(e).__name__}: {e}".splitlines()[0]}


class GeneratorReplica:
    def __init__(self, artifact_dir: str, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, batch_wait_s: float = 0.0):
        self.threads = assigned_threads()
        self.generator = OrtGenerator.load(artifact_dir, threads=self.threads)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.counters: Counter[str] = Counter()
        self._counters_lock = threading.Lock()  # written by the generation thread, read by `stats`
        self.generator.generate([self.generator.eos_token_ids[0] if self.generator.eos_token_ids else 0],
                                WARMUP_TOKENS, eos_token_id=[])
        self.batcher = ContinuousBatcher(self.generator, max_batch_size)
        self.batch_wait_s = float(batch_wait_s)
        self.inbox: queue.Queue[Job] = queue.Queue()
        self.running: dict[int, tuple[Job, Lane]] = {}  # slot -> its request; only the generation thread touches it
        self._stopping = threading.Event()
        self.worker = threading.Thread(target=self._generation_thread, name="elision-generation", daemon=True)
        self.worker.start()

    async def generate(self, request: dict):
        """Stream the events of one generation: ("text", piece)*, then ("done", result) or ("error", {status,
        message}). Cancelling the call (the client went away) takes it out of the batch at the next step."""
        job = Job(request, asyncio.get_running_loop())
        self.inbox.put(job)
        try:
            while True:
                kind, payload = await job.events.get()
                yield kind, payload
                if kind in ("done", "error"):
                    return
        finally:
            job.cancelled.set()  # a no-op once the generation is over

    def check_health(self) -> None:
        if not self.worker.is_alive():
            raise RuntimeError("the generation thread of this replica stopped")

    def __del__(self) -> None:
        self._stopping.set()

    # ------------------------------------------------------------------ the generation thread
    def _generation_thread(self) -> None:
        waiting: collections.deque[Job] = collections.deque()
        while not self._stopping.is_set():
            try:
                self._collect(waiting)
                self._admit(waiting)
                self._drop_cancelled()
                self._step()
            except Exception as e:  # noqa: BLE001 - a bug must fail the requests it touched, not the replica
                log.exception("generation step failed")
                for job, _ in self.running.values():
                    self._count("failed", 1)
                    job.emit("error", failure(e))
                self.running.clear()
                self.batcher.clear()

    def _collect(self, waiting: collections.deque) -> None:
        """Move arrived requests to `waiting`; block while the replica has nothing to do (bounded, to notice a
        stop), then give a burst `batch_wait_s` to gather."""
        if not self.running and not waiting:
            try:
                waiting.append(self.inbox.get(timeout=IDLE_POLL_S))
            except queue.Empty:
                return
            deadline = time.monotonic() + self.batch_wait_s
            while len(waiting) < self.batcher.max_batch_size and (left := deadline - time.monotonic()) > 0:
                try:
                    waiting.append(self.inbox.get(timeout=left))
                except queue.Empty:
                    break
        while True:
            try:
                waiting.append(self.inbox.get_nowait())
            except queue.Empty:
                return

    def _admit(self, waiting: collections.deque) -> None:
        while waiting and self.batcher.free_slots:
            job = waiting.popleft()
            if job.cancelled.is_set():
                self._count("cancelled_before_start", 1)
                continue
            try:
                lane = self.batcher.add(batch_request(job))
            except GenerationError as e:  # the front checks requests first; this is the replica's own check
                self._count("refused", 1)
                job.emit("error", {"status": 400, "message": str(e)})
                continue
            except Exception as e:  # noqa: BLE001 - this request alone failed (its prefill); the batch goes on
                log.exception("admitting a generation failed")
                self._count("failed", 1)
                job.emit("error", failure(e))
                continue
            if lane.result is not None:
                self._done(job, lane)
            else:
                self.running[lane.slot] = (job, lane)

    def _drop_cancelled(self) -> None:
        for slot, (job, lane) in list(self.running.items()):
            if job.cancelled.is_set():
                self.batcher.cancel(lane)
                del self.running[slot]
                self._count("cancelled", 1)
                self._count("cancelled_steps", lane.steps)

    def _step(self) -> None:
        if not self.running:
            return
        self._count("max_running", max(0, len(self.running) - self.counters["max_running"]))
        for lane in self.batcher.step():
            job, _ = self.running.pop(lane.slot)
            self._done(job, lane)

    def _done(self, job: Job, lane: Lane) -> None:
        result = lane.result
        self._count("completed", 1)
        self._count("tokens", len(result.tokens))
        job.emit("done", {"tokens": result.tokens, "text": result.text, "stats": result.stats,
                          "prompt_tokens": len(result.prompt), "replica": self.replica_id})

    def _count(self, key: str, n: int = 1) -> None:
        with self._counters_lock:
            self.counters[key] += n

    def stats(self) -> dict:
        """Counters of this replica (completed, cancelled, refused, failed generations; tokens; the most requests
        decoded together), its node and settings."""
        with self._counters_lock:
            counters = dict(self.counters)
        return {"replica": self.replica_id, "node": ray.get_runtime_context().get_node_id(), "threads": self.threads,
                "max_batch_size": self.batcher.max_batch_size, "running": len(self.running), **counters}
