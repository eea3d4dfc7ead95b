"""One generation request inside a replica: the bridge between the generation thread and the request's coroutine.

The generation loop runs in a worker thread (so the replica's event loop stays free for health checks and
cancellations); it reports through `Job.on_text`, the `stream` callback of `OrtGenerator.generate`, which the loop
calls after the prefill and after every verification step. That callback is also where a cancelled request stops:
it raises `GenerationCancelled` at the first step after the client went away.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Any


class GenerationCancelled(Exception):
    """The request was cancelled (client disconnect); raised inside the generation loop between two steps."""


class Job:
    def __init__(self, request: dict, loop: asyncio.AbstractEventLoop):
        self.request = request  # {"prompt_ids", "max_new_tokens", "stream", "options"} from the HTTP front
        self.loop = loop
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.steps = 0  # stream-callback calls so far: prefill + verification steps

    def emit(self, kind: str, payload: Any = None) -> None:
        """Hand an event to the request's coroutine (thread-safe): ("text", piece), ("done", result), ("error", {..})."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))

    def on_text(self, piece: str) -> None:
        self.steps += 1
        if self.cancelled.is_set():
            raise GenerationCancelled
        if piece and self.request.get("stream"):
            self.emit("text", piece)
