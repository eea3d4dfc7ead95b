"""Start and stop the service: a local Ray (the embedded default) or an existing cluster, and the Serve application.

    with Service("gen/", ServeOptions(replicas=2, port=8000)) as service:
        requests.post(f"{service.url}/v1/completions", json={"prompt": "def parse(", "max_tokens": 32})

The application has two deployments: `ingress` (the HTTP front, one light async replica) and `generator` (N
replicas, one `OrtGenerator` each). On a cluster Ray Serve spreads the generator replicas over the nodes; the
artifact directory must be readable at the same path on every node that runs one (a shared filesystem).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import ray
from ray import serve
from ray.serve.config import BackpressureConfig

from elision.apps.serve.ingress import RETRY_AFTER_S, CompletionsIngress
from elision.apps.serve.protocol import ModelCard
from elision.apps.serve.replica import DEFAULT_MAX_BATCH_SIZE, GeneratorReplica
from elision.runtime.generation.ort_generator import OrtGenerator

APP_NAME = "elision"
PROXY_LOCATIONS = ("EveryNode", "HeadOnly")
FRONT_HEADROOM = 16            # requests the front holds beyond the generators' capacity and queue (health checks...)
EMBEDDED_OBJECT_STORE = 256 << 20  # requests and events are small; the weights never go through the object store


@dataclass
class ServeOptions:
    replicas: int = 1
    host: str = "127.0.0.1"
    port: int = 8000
    address: str | None = None      # join this Ray cluster; None starts a local one
    replica_cpus: float = 1.0       # Ray CPUs per generator replica (its ORT intra-op threads: the whole part, >= 1)
    max_queued: int = 32            # requests waiting for a replica before the service answers 503
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE  # requests one replica decodes together (1: no batching)
    batch_wait_ms: float = 0.0      # how long the first request reaching an idle replica waits for company
    name: str | None = None         # model id in the API (default: the artifact directory's name)
    ray_cpus: int | None = None     # size of the embedded local Ray (default: this machine's cores)
    proxy_location: str = "EveryNode"  # Ray Serve HTTP proxies: on EveryNode (of the cluster) or HeadOnly

    def check(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"--replicas must be >= 1, got {self.replicas}")
        if not 0 < self.port < 65536:
            raise ValueError(f"--port must be in 1..65535, got {self.port}")
        if self.replica_cpus <= 0:
            raise ValueError(f"--replica-cpus must be > 0, got {self.replica_cpus}")
        if self.max_queued < 1:
            raise ValueError(f"--max-queued must be >= 1, got {self.max_queued}")
        if self.max_batch_size < 1:
            raise ValueError(f"--max-batch-size must be >= 1, got {self.max_batch_size}")
        if not 0 <= self.batch_wait_ms <= 10_000:
            raise ValueError(f"--batch-wait-ms must be in 0..10000, got {self.batch_wait_ms:g}")
        if self.proxy_location not in PROXY_LOCATIONS:
            raise ValueError(f"--proxy-location must be one of {', '.join(PROXY_LOCATIONS)}, got {self.proxy_location!r}")


def load_model_card(artifact_dir: str | Path, name: str | None = None) -> ModelCard:
    """Load and check the artifact here, before any replica does (a bad directory is a one-line error, not a
    deployment that fails on every replica), and describe it for the HTTP front."""
    gen = OrtGenerator.load(artifact_dir, threads=1)
    return ModelCard(name=name or Path(artifact_dir).resolve().name, max_positions=gen.max_positions,
                     vocab_size=gen.vocab_size, eos_token_ids=tuple(gen.eos_token_ids),
                     tokenizer_json=gen.tokenizer.to_str())


def build_application(artifact_dir: str | Path, card: ModelCard, options: ServeOptions):
    capacity = options.replicas * options.max_batch_size
    generator = serve.deployment(GeneratorReplica).options(
        name="generator",
        num_replicas=options.replicas,
        ray_actor_options={"num_cpus": options.replica_cpus},
        max_ongoing_requests=options.max_batch_size,  # what fits in a replica's batch; the rest waits in the queue
        max_queued_requests=options.max_queued,  # per caller: the front is the only one
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=RETRY_AFTER_S),
        health_check_period_s=2.0,
        graceful_shutdown_wait_loop_s=0.5,
        graceful_shutdown_timeout_s=5.0,
    ).bind(str(Path(artifact_dir).resolve()), options.max_batch_size, options.batch_wait_ms / 1000)
    front = serve.deployment(CompletionsIngress).options(
        name="ingress",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=capacity + options.max_queued + FRONT_HEADROOM,
        max_queued_requests=FRONT_HEADROOM,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=RETRY_AFTER_S),
        graceful_shutdown_timeout_s=5.0,
    )
    return front.bind(generator, card)


def generator_replica_names() -> list[str]:
    """Ray actor names of the running generator replicas (what a fault test kills); needs a connected driver."""
    prefix = f"SERVE_REPLICA::{APP_NAME}#generator#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))


def replicas_running(replicas: int) -> bool:
    """Whether the generator deployment is HEALTHY with `replicas` replicas RUNNING."""
    status = serve.status().applications.get(APP_NAME)
    dep = status.deployments.get("generator") if status else None
    return dep is not None and dep.status == "HEALTHY" and dep.replica_states.get("RUNNING", 0) == replicas


def wait_replicas_running(replicas: int, timeout_s: float = 60.0, replacing: list[str] | None = None) -> bool:
    """Whether `replicas` generator replicas are RUNNING within `timeout_s`. With `replacing` (the replica names
    before some died), only once a replacement exists: right after a kill the controller may not have noticed yet
    and still count the dead replica as running."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        fresh = replacing is None or any(n not in replacing for n in generator_replica_names())
        if fresh and replicas_running(replicas):
            return True
        time.sleep(0.25)
    return False


class Service:
    def __init__(self, artifact_dir: str | Path, options: ServeOptions | None = None):
        self.artifact_dir = Path(artifact_dir)
        self.options = options or ServeOptions()
        self.options.check()
        self.card: ModelCard | None = None
        self._running = False
        self._owns_connection = False

    @property
    def url(self) -> str:
        return f"http://{self.options.host}:{self.options.port}"

    def start(self) -> "Service":
        self.card = load_model_card(self.artifact_dir, self.options.name)
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report leaves the machine
        # Ray Serve gives its HTTP proxy 3 x 5 s to start; on a busy small machine (2 cores, other jobs) it takes
        # longer and the service dies at start-up. The embedded Ray inherits these (a cluster keeps its own).
        for name in ("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S"):
            os.environ.setdefault(name, "60")
        # quiet by default: replicas' logs stay in Ray's session directory, Ray's own warnings (token auth, retried
        # controller calls at shutdown) are not the user's business
        quiet = {"log_to_driver": False, "logging_level": logging.ERROR, "include_dashboard": False}
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        self._owns_connection = not ray.is_initialized()  # a Ray this process already uses stays as it is
        if self._owns_connection and self.options.address is not None:
            ray.init(address=self.options.address, **quiet)
        elif self._owns_connection:
            # "local": a new Ray even where RAY_ADDRESS names a cluster (that is what --address is for)
            ray.init(address="local", num_cpus=self.options.ray_cpus or os.cpu_count(),
                     object_store_memory=EMBEDDED_OBJECT_STORE, **quiet)
        try:
            serve.start(http_options={"host": self.options.host, "port": self.options.port},
                        proxy_location=self.options.proxy_location,
                        logging_config={"log_level": "WARNING", "enable_access_log": False})
            serve.run(build_application(self.artifact_dir, self.card, self.options), name=APP_NAME,
                      route_prefix="/", blocking=False)
            self._running = True
        except BaseException:
            self.shutdown()
            raise
        return self

    def set_replicas(self, replicas: int, timeout_s: float = 300.0, max_batch_size: int | None = None) -> None:
        """Scale the generator deployment to `replicas` (and, given, a new batch size: the replicas are replaced)
        while the service keeps answering."""
        before = generator_replica_names() if max_batch_size not in (None, self.options.max_batch_size) else None
        self.options.replicas = replicas
        if max_batch_size is not None:
            self.options.max_batch_size = max_batch_size
        self.options.check()
        serve.run(build_application(self.artifact_dir, self.card, self.options), name=APP_NAME, route_prefix="/",
                  blocking=False)
        deadline = time.monotonic() + timeout_s
        while before and set(before) & set(generator_replica_names()) and time.monotonic() < deadline:
            time.sleep(0.25)  # a new batch size: every replica is replaced (a rolling update)
        if not wait_replicas_running(replicas, max(1.0, deadline - time.monotonic()), replacing=before):
            raise TimeoutError(f"{replicas} generator replicas were not running within {timeout_s:g} s")

    def generator_handle(self):
        return serve.get_deployment_handle("generator", APP_NAME)

    def replica_actor_names(self) -> list[str]:
        """Ray actor names of the running generator replicas (what a fault test kills)."""
        return generator_replica_names()

    def wait_replicas_running(self, timeout_s: float = 60.0) -> bool:
        return wait_replicas_running(self.options.replicas, timeout_s)

    def shutdown(self) -> None:
        """Remove the application; a Ray this service started is stopped with all its processes."""
        if ray.is_initialized():
            if self._running:
                serve.delete(APP_NAME)  # replicas finish what they hold (graceful_shutdown_timeout_s)
            # a Ray we started goes with all its processes (the Serve controller and proxies too); a cluster we
            # joined keeps running and we only disconnect from it
            if self._owns_connection:
                ray.shutdown()
        self._running = False

    def __enter__(self) -> "Service":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()


__all__ = ["APP_NAME", "Service", "ServeOptions", "build_application", "generator_replica_names", "load_model_card",
           "replicas_running", "wait_replicas_running"]
