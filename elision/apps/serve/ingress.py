"""The HTTP front (a Ray Serve ingress deployment): OpenAI-compatible `/v1/completions`, `/v1/models`, `/healthz`.

It checks each request (protocol.py; bad input never takes a place in a queue), then calls the generator
deployment through a handle whose queue is bounded: when it is full the handle refuses the call and the client gets
503 with Retry-After. The front itself is light (async, no model), so `/healthz` answers while every replica is busy.

Failures: a replica that dies before the client received anything is retried on another replica (a generation has
no side effects); once streamed text has left, the stream ends with an error event. A client that disconnects
cancels its call, and the replica stops that generation at its next step.
"""
# no `from __future__ import annotations`: FastAPI reads the route signatures (`request: Request`) at run time
import asyncio
import logging
import math
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from tokenizers import Tokenizer

from elision.apps.serve.protocol import (SSE_DONE, Completion, CompletionRequest, ModelCard, RequestError,
                                         check_limits, error_body, finish_reason, parse_completion_request, sse)
from elision.apps.serve.stop_text import StopTextFilter, cut_at_stop

ATTEMPTS = 3          # tries of one generation when replicas die under it (before anything reached the client)
RETRY_AFTER_S = 1     # what an overloaded service tells clients to wait
REPLICA_FAILURES = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)

log = logging.getLogger("ray.serve")
app = FastAPI(title="elision serve", docs_url=None, redoc_url=None)


class ServiceError(Exception):
    """The service cannot answer this request now (overload or lost replicas): an HTTP status and its headers."""

    def __init__(self, message: str, status: int, kind: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.kind, self.retry_after_s = status, kind, retry_after_s

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(math.ceil(self.retry_after_s))} if self.retry_after_s is not None else None
        return JSONResponse(error_body(str(self), self.kind), status_code=self.status, headers=headers)


# defined before the class: `serve.ingress` copies the class's functions with the module globals of that moment
async def _next(events: DeploymentResponseGenerator) -> tuple:
    try:
        return await events.__anext__()
    except StopAsyncIteration:  # the replica's generator always ends with done/error; a bare end is a lost replica
        raise ReplicaUnavailableError("generator stream") from None


def _replica_error(info: dict) -> JSONResponse:
    kind = "invalid_request_error" if info["status"] == 400 else "generation_error"
    return JSONResponse(error_body(info["message"], kind), status_code=info["status"])


@serve.ingress(app)
class CompletionsIngress:
    def __init__(self, generator: DeploymentHandle, card: ModelCard):
        self.generator = generator.options(stream=True)
        self.card = card
        self.tokenizer = Tokenizer.from_str(card.tokenizer_json)

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.card.name}

    @app.get("/v1/models")
    async def models(self) -> dict:
        return self.card.models_list()

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        try:
            req = parse_completion_request(await request.body())
            ids = self.tokenizer.encode(req.prompt).ids
            check_limits(req, len(ids), self.card)
        except RequestError as e:
            return JSONResponse(e.body(), status_code=e.status)
        job = {"prompt_ids": ids, "max_new_tokens": req.max_tokens, "stream": req.stream,
               "options": req.generation_options()}
        completion = Completion(self.card.name)
        try:
            if req.stream:
                first, events = await self._start(job)
                if first[0] == "error":
                    return _replica_error(first[1])
                return StreamingResponse(self._sse(req, completion, first, events), media_type="text/event-stream")
            return await self._complete(req, job, completion)
        except ServiceError as e:
            return e.response()

    async def _start(self, job: dict) -> tuple[tuple, DeploymentResponseGenerator]:
        """Send `job` to a replica and wait for its first event, retrying when the replica dies first."""
        for attempt in range(ATTEMPTS):
            events = self.generator.generate.remote(job)
            try:
                return await _next(events), events
            except asyncio.CancelledError:  # the client left while the request waited for a replica
                events.cancel()
                raise
            except BackPressureError as e:
                raise ServiceError(f"the service is at capacity ({e.message}); retry later", 503, "overloaded",
                                   e.retry_after_s if e.retry_after_s is not None else RETRY_AFTER_S) from None
            except REPLICA_FAILURES as e:
                log.warning("replica failed before answering (%s); %s", type(e).__name__,
                            "retrying" if attempt + 1 < ATTEMPTS else "giving up")
                failure = e
        raise ServiceError(f"the generation failed on {ATTEMPTS} replicas in a row ({type(failure).__name__}); "
                           f"retry later", 503, "replica_failure", RETRY_AFTER_S)

    async def _complete(self, req: CompletionRequest, job: dict, completion: Completion) -> JSONResponse:
        """A whole generation; retried from the start when its replica dies (nothing was sent yet)."""
        for attempt in range(ATTEMPTS):
            first, events = await self._start(job)
            try:
                event = first
                while event[0] == "text":
                    event = await _next(events)
            except REPLICA_FAILURES as e:
                log.warning("replica failed during a generation (%s); %s", type(e).__name__,
                            "retrying" if attempt + 1 < ATTEMPTS else "giving up")
                failure = e
                continue
            finally:
                events.cancel()  # a no-op once finished; stops the generation if this request was cancelled
            if event[0] == "error":
                return _replica_error(event[1])
            result = event[1]
            text, found = cut_at_stop(result["text"], req.stop or [])
            reason = "stop" if found else finish_reason(result["tokens"], req.max_tokens, self.card.eos_token_ids)
            return JSONResponse(completion.body(text, reason, result))
        raise ServiceError(f"the generation failed on {ATTEMPTS} replicas in a row ({type(failure).__name__}); "
                           f"retry later", 503, "replica_failure", RETRY_AFTER_S)

    async def _sse(self, req: CompletionRequest, completion: Completion, first: tuple,
                   events: DeploymentResponseGenerator) -> AsyncIterator[str]:
        stops = StopTextFilter(req.stop or [])
        event = first
        try:
            while event[0] == "text":
                piece = stops.push(event[1])
                if piece:
                    yield completion.chunk(piece)
                event = await _next(events)
            if event[0] == "error":
                yield sse(error_body(event[1]["message"], "generation_error"))
            else:
                result = event[1]
                reason = ("stop" if stops.stopped else
                          finish_reason(result["tokens"], req.max_tokens, self.card.eos_token_ids))
                yield completion.last_chunk(stops.finish(), reason, result)
        except REPLICA_FAILURES as e:
            yield sse(error_body(f"the replica serving this stream failed ({type(e).__name__}); the text so far is "
                                 f"incomplete", "replica_failure"))
        finally:
            events.cancel()  # the client went away (or the stream ended): stop the generation at its next step
        yield SSE_DONE


__all__ = ["ATTEMPTS", "CompletionsIngress", "RETRY_AFTER_S", "ServiceError", "app"]
