"""`elision serve DIR`: an OpenAI-compatible HTTP service over a generation artifact, on Ray Serve.

    elision serve gen/ --replicas 2 --port 8000                 # a local Ray on this machine
    elision serve gen/ --replicas 8 --address 10.0.0.1:6379     # join a Ray cluster; replicas spread over its nodes
    elision serve gen/ --max-batch-size 16 --batch-wait-ms 5    # up to 16 requests decoded together per replica
    curl -s localhost:8000/v1/completions -d '{"prompt": "def parse(", "max_tokens": 32, "temperature": 0}'

Needs the `serve` extra (`pip install 'elision[serve]'`); Ray is imported only when the command runs.
"""
from __future__ import annotations

import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from elision.cli import failures
from elision.errors import require_extra

_out = Console(emoji=False)  # model names are user text: no :emoji: codes


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _wait_for_signal() -> None:
    """Block until SIGINT or SIGTERM (the service runs in Ray's processes, not in this one)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve_cmd(
        artifact_dir: Path = typer.Argument(..., help="generation artifact (`elision compile MODEL --emit onnx --for generate`)"),
        replicas: int = typer.Option(1, "--replicas", help="generator replicas (one onnxruntime generator each)"),
        host: str = typer.Option("127.0.0.1", "--host", help="HTTP address to bind"),
        port: int = typer.Option(8000, "--port", help="HTTP port"),
        address: Optional[str] = typer.Option(None, "--address", help="join this Ray cluster (host:port, ray://..., "
                                              "or auto) instead of starting a local Ray"),
        replica_cpus: float = typer.Option(1.0, "--replica-cpus", help="CPUs per replica (its onnxruntime threads)"),
        max_queued: int = typer.Option(32, "--max-queued", help="requests waiting for a replica before 503 + Retry-After"),
        max_batch_size: int = typer.Option(8, "--max-batch-size", help="requests one replica decodes together "
                                           "(continuous batching: a request joins the running batch at the next "
                                           "step); 1 turns batching off"),
        batch_wait_ms: float = typer.Option(0.0, "--batch-wait-ms", help="how long the first request reaching an "
                                            "idle replica waits for others to start with it"),
        name: Optional[str] = typer.Option(None, "--name", help="model id in the API (default: the directory name)"),
        ray_cpus: Optional[int] = typer.Option(None, "--ray-cpus", help="CPUs of the local Ray (default: all cores)"),
        proxy_location: str = typer.Option("EveryNode", "--proxy-location",
                                           help="HTTP proxies on EveryNode of the cluster or on the HeadOnly"),
    ) -> None:
        """Serve a generation artifact over HTTP (OpenAI-compatible /v1/completions with streaming, /v1/models,
        /healthz) with Ray Serve: replicas run the speculative onnxruntime loop; Ctrl-C stops the service."""
        require_extra("serve", "elision serve")
        # lazy: ray (optional, extra `serve`) and onnxruntime, which `elision --help` must not pay for
        from elision.apps.serve.service import ServeOptions, Service
        from elision.runtime.artifact import ArtifactError

        options = ServeOptions(replicas=replicas, host=host, port=port, address=address, replica_cpus=replica_cpus,
                               max_queued=max_queued, max_batch_size=max_batch_size,
                               batch_wait_ms=batch_wait_ms, name=name, ray_cpus=ray_cpus,
                               proxy_location=proxy_location)
        try:
            options.check()
        except ValueError as e:
            raise failures.fail(str(e)) from None
        if address is None and not _port_free(host, port):
            raise failures.fail(f"cannot listen on {host}:{port}: the port is in use or the address is not this machine's; "
                        f"pick another with --port/--host")
        service = Service(artifact_dir, options)
        try:
            service.start()
        except ArtifactError as e:
            raise failures.fail(str(e)) from None
        except ConnectionError as e:
            raise failures.fail(f"cannot join the Ray cluster at {address}: {str(e).splitlines()[0]}") from None
        try:
            import ray  # lazy: optional (extra `serve`), imported above by the service already

            where = f"Ray cluster {address}" if address else f"local Ray ({ray.cluster_resources().get('CPU', 0):g} CPUs)"
            _out.print(f"serving {service.card.name} at {service.url}/v1 ({replicas} replica{'s' * (replicas > 1)} x "
                       f"{replica_cpus:g} CPU, batches of up to {max_batch_size} on {where}, gcs {ray.get_runtime_context().gcs_address}); "
                       f"Ctrl-C stops", markup=False, highlight=False, soft_wrap=True)
            sys.stdout.flush()  # scripts wait for this line on a pipe
            _wait_for_signal()
        finally:
            service.shutdown()
        _out.print("stopped")
