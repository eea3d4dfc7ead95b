"""`elision tune --ray`: the tuner's candidate evaluations as Ray tasks, in parallel over a machine's or a cluster's
CPUs (needs the `serve` extra, which brings Ray).

Workers are Ray actors that receive the model and the calibration inputs once (shipping the model with every task
would cost more than evaluating a candidate); each candidate is one task on some worker.

Same choice as the local run: a fidelity report is a deterministic function of (model, inputs, plan, torch threads),
and every worker uses the driver's torch thread count, so each report is the very number the local run computes;
`tune` receives them in its own order. Timings are all taken by one worker, in interleaved rounds with the
unchanged model, so candidates are compared within one process, as in the local run.
"""
from __future__ import annotations

import logging
import os
from typing import Callable

import ray
import torch
from ray.util.actor_pool import ActorPool

from elision.apps.tokens.executor import EncoderAdapter, ReductionPlan
from elision.apps.tokens.fidelity import FidelityReport
from elision.apps.tokens.search import LocalEvaluator


@ray.remote
class TuneWorker:
    def __init__(self, adapter: EncoderAdapter, calib: tuple, kind: str, labels, threads: int):
        torch.set_num_threads(threads)  # the driver's count: the same kernels, hence the same numbers
        self.evaluator = LocalEvaluator(adapter, calib, kind, labels)

    def report(self, index: int, plan: ReductionPlan) -> tuple[int, FidelityReport | None]:
        return index, self.evaluator.reports([plan])[0]

    def latencies(self, plans: list[ReductionPlan], repeats: int) -> list[float]:
        return self.evaluator.latencies(plans, repeats)


class RayEvaluator:
    """The `tune(..., evaluator=)` that runs candidates on Ray. `address`: None or "local" starts a Ray on this
    machine; otherwise a cluster address (host:port, ray://..., auto). A Ray this process is already connected
    to is used as it is."""

    def __init__(self, adapter: EncoderAdapter, calib: tuple, kind: str, labels=None, *, address: str | None = None,
                 threads: int | None = None, workers: int | None = None):
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            quiet = dict(log_to_driver=False, logging_level=logging.ERROR, include_dashboard=False)
            if address in (None, "local"):
                ray.init(address="local", num_cpus=os.cpu_count(), **quiet)
            else:
                ray.init(address=address, **quiet)
        self.threads = int(threads or torch.get_num_threads())
        cpus = int(ray.cluster_resources().get("CPU", 1))
        count = workers or max(1, cpus // self.threads)
        model, inputs, targets = ray.put(adapter), ray.put(calib), ray.put(labels)
        self.workers = [TuneWorker.options(num_cpus=self.threads).remote(model, inputs, kind, targets, self.threads)
                        for _ in range(count)]

    def reports(self, plans: list[ReductionPlan], done: Callable[[int], None] | None = None
                ) -> list[FidelityReport | None]:
        out: list[FidelityReport | None] = [None] * len(plans)
        pool = ActorPool(self.workers)
        for index, report in pool.map_unordered(lambda w, item: w.report.remote(*item), list(enumerate(plans))):
            out[index] = report
            if done:
                done(index)
        return out

    def latencies(self, plans: list[ReductionPlan], repeats: int) -> list[float]:
        return ray.get(self.workers[0].latencies.remote(plans, repeats))

    def close(self) -> None:
        for w in self.workers:
            ray.kill(w)
        self.workers = []
        if self._owns_ray:
            ray.shutdown()


__all__ = ["RayEvaluator", "TuneWorker"]
