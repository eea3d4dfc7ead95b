"""One generation request inside a replica: the bridge between the replica's generation thread and the request's
coroutine.

The generation thread (replica.py) decodes every running request of the replica together; it reports through
`Job.emit` (text pieces for streams, then the result or an error), and reads `Job.cancelled` between two decoding
steps: a request whose client went away leaves the batch there.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Any


class Job:
    def __init__(self, request: dict, loop: asyncio.AbstractEventLoop):
        self.request = request  # {"prompt_ids", "max_new_tokens", "stream", "options"} from the HTTP front
        self.loop = loop
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.cancelled = threading.Event()

    def emit(self, kind: str, payload: Any = None) -> None:
        """Hand an event to the request's coroutine (thread-safe): ("text", piece), ("done", result), ("error", {..})."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))

    def on_text(self, piece: str) -> None:
        """A streamed piece of text (the generation thread calls it only for streaming requests)."""
        self.emit("text", piece)
