"""Continuous batching: generation requests join and leave one running batch between decoding steps.

    batcher = ContinuousBatcher(OrtGenerator.load("gen/"), max_batch_size=8)
    lane = batcher.add(BatchRequest(prompt_ids, 64, on_text=print))   # GenerationError: refused, batch untouched
    while batcher.lanes:
        for lane in batcher.step():          # one forward over every running request's tree
            lane.result                      # an OrtGenerationResult, like OrtGenerator.generate's
    batcher.cancel(lane)                     # its row is free for the next request at once

One session holds `max_batch_size` rows, each with a KV cache as long as the model's position limit. A request
that arrives while others decode is prefilled alone into the next free row and takes part from the next step on
(it never waits for a long request to finish, and nobody waits for its prompt beyond that one prefill forward);
a request that finishes or is cancelled leaves at once, the last row moving into its place, so each forward covers
exactly the running requests (`elision.runtime.generation.loop.DecodeBatch`). Every request keeps its own length
limit, stop strings and sampling options (temperature, top-p, top-k, its own seeded random source); greedy output
is the model's greedy decoding whoever else is in the batch (the step's K/V and logits of a row depend only on that
row), so it equals `OrtGenerator.generate` alone.

Dynamic trees are sized from verification-cost curves per batch size, measured when the batcher is made for 1, 2,
4, ... up to `max_batch_size` rows; a batch of k rows uses the curve of the smallest measured size >= k. As in
`OrtGenerator.generate`, a `SpeculationGate` runs plain one-token steps for the whole batch while speculation
measures slower per request (on text the drafter cannot predict, a batch of wide trees costs far more than it
gains); the tokens never depend on it.

Not thread-safe: one thread drives a batcher (the serving replica's generation thread).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from elision.runtime.generation.bookkeeping import IncrementalDecoder, generation_stats
from elision.runtime.generation.loop import DecodeBatch, DecodeOptions, SequenceOptions
from elision.runtime.generation.ort_generator import GenerationError, OrtGenerationResult, OrtGenerator
from elision.runtime.generation.tree import TokenTree
from elision.runtime.generation.tree_builders import VerifyCostCurve

__all__ = ["BatchRequest", "ContinuousBatcher", "Lane", "curve_batch_sizes"]


@dataclass
class BatchRequest:
    """One generation request: `OrtGenerator.generate`'s per-request arguments."""

    prompt: Sequence[int] | str
    max_new_tokens: int = 64
    stop_strings: Sequence[str] | str | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    on_text: Callable[[str], None] | None = None  # text pieces as tokens are accepted (streaming)


@dataclass
class Lane:
    """A request while it runs in the batch, and its result once it is done."""

    request: BatchRequest
    slot: int
    prompt: list[int]
    started: float  # perf_counter when it was added
    decoder: IncrementalDecoder | None = None
    timing: dict[str, float] = field(default_factory=lambda: dict(prefill_s=0.0, cost_curve_s=0.0, draft_s=0.0,
                                                                  verify_s=0.0, accept_s=0.0))
    tree_sizes: list[int] = field(default_factory=list)
    plain_steps: int = 0  # of its steps, those without a tree
    largest_batch: int = 1  # the most requests that shared a forward with it (itself included)
    result: OrtGenerationResult | None = None

    @property
    def steps(self) -> int:
        """Verification steps it took part in."""
        return len(self.tree_sizes)


def curve_batch_sizes(max_batch_size: int) -> list[int]:
    """Batch sizes whose cost curves are measured: powers of two below `max_batch_size`, and itself."""
    sizes, k = [], 1
    while k < max_batch_size:
        sizes.append(k)
        k *= 2
    return sizes + [max_batch_size]


class ContinuousBatcher:
    def __init__(self, generator: OrtGenerator, max_batch_size: int = 8, capacity: int | None = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.generator = gen = generator
        self.max_batch_size = max_batch_size
        template = gen.tree_template
        budget = len(template) if template is not None else gen.max_tree_size
        # every row can hold a request up to the position limit plus one verification tree past its end
        self.limit = gen.max_positions if capacity is None else capacity - budget - 1
        if self.limit is None:
            raise ValueError("the artifact has no position limit: pass the KV capacity per request (capacity=...)")
        self.session = gen.new_session(max_batch_size, self.limit + budget + 1)
        self.curves: dict[int, VerifyCostCurve] = {}
        if template is None:
            self.curves = {k: gen.batch_cost_curve(k) for k in curve_batch_sizes(max_batch_size)}
        self.opts = DecodeOptions(max_new_tokens=1, tokenizer=gen.tokenizer, template=template,
                                  tree_name=gen.tree_spec, max_tree_size=gen.max_tree_size, max_depth=gen.max_depth,
                                  on_tokens=self._on_tokens, on_step=self._on_step,
                                  speculation_gate=template is None)  # as `OrtGenerator.generate`: never slower than plain
        self.draft = gen.drafter(gen.drafter_name)
        self.clear()

    def clear(self) -> None:
        """Drop every running request (after a failed step, whose state cannot be trusted): an empty batch."""
        self.batch = DecodeBatch(self.session, self.draft, self.opts, self.max_batch_size)
        self.draft.reset([], None)  # per-sequence drafter state starts empty; requests `admit` into their slots
        self.lanes: dict[int, Lane] = {}  # slot -> running request

    @property
    def free_slots(self) -> int:
        return self.max_batch_size - len(self.lanes)

    def add(self, request: BatchRequest) -> Lane:
        """Check `request` (GenerationError: refused, nothing else changes) and prefill it into a free row. It may
        be done at once (EOS or a one-token limit): then it is not in `lanes` and its `result` is set."""
        if not self.free_slots:
            raise RuntimeError(f"the batch is full ({self.max_batch_size} requests)")
        gen = self.generator
        ids, seq = gen.check_request(request.prompt, request.max_new_tokens, stop_strings=request.stop_strings,
                                     do_sample=request.do_sample, temperature=request.temperature,
                                     top_k=request.top_k, top_p=request.top_p, seed=request.seed)
        if len(ids) + request.max_new_tokens > self.limit:
            raise GenerationError(f"a {len(ids)}-token prompt plus max_new_tokens={request.max_new_tokens} exceeds "
                                  f"the {self.limit} positions each request may use here")
        slot = next(s for s in range(self.max_batch_size) if s not in self.lanes)
        lane = self.lanes[slot] = Lane(request, slot, ids, time.perf_counter(),
                                       IncrementalDecoder(gen.tokenizer) if request.on_text is not None else None)
        before = dict(self.batch.timing)
        try:
            self.batch.join(slot, ids, seq)
        except BaseException:
            del self.lanes[slot]
            raise
        for k, v in self.batch.timing.items():
            lane.timing[k] += v - before[k]
        if not self.batch.active[slot]:
            self._finish(slot)
        return lane

    def step(self) -> list[Lane]:
        """One forward over every running request; returns those that finished (they have left the batch)."""
        if not self.lanes:
            return []
        rows = len(self.batch.rows)
        self.batch.curve = self._curve(rows) if self.curves else None
        before = dict(self.batch.timing)
        self.batch.step()
        for lane in self.lanes.values():
            lane.largest_batch = max(lane.largest_batch, rows)
            for k, v in self.batch.timing.items():
                lane.timing[k] += v - before[k]
        return [self._finish(slot) for slot in list(self.lanes) if not self.batch.active[slot]]

    def cancel(self, lane: Lane) -> None:
        """Stop a running request now; its row is free for the next `add`."""
        if self.lanes.get(lane.slot) is lane:
            del self.lanes[lane.slot]
            self.batch.leave(lane.slot)

    def _curve(self, rows: int) -> VerifyCostCurve:
        fits = [k for k in self.curves if k >= rows]
        return self.curves[min(fits) if fits else max(self.curves)]

    def _on_tokens(self, slot: int, new: list[int]) -> None:
        lane = self.lanes[slot]
        if lane.decoder is not None:
            piece = lane.decoder.push(new)
            if piece:
                lane.request.on_text(piece)

    def _on_step(self, slot: int, tree: TokenTree, path: list[int], bonus: int) -> None:
        lane = self.lanes[slot]
        lane.tree_sizes.append(len(tree))
        lane.plain_steps += self.batch.stepping_plain

    def _finish(self, slot: int) -> Lane:
        lane = self.lanes.pop(slot)
        tokens = list(self.batch.outputs[slot])
        self.batch.leave(slot)
        if lane.decoder is not None:
            piece = lane.decoder.finish()
            if piece:
                lane.request.on_text(piece)
        gen = self.generator
        stats = generation_stats(outputs=[tokens], accepted_lengths=[self.batch.accepted[slot]],
                                 tree_sizes=lane.tree_sizes, steps=lane.steps,
                                 total_s=time.perf_counter() - lane.started, timing=lane.timing,
                                 draft_forward_passes=self.draft.draft_forward_passes, drafter=self.draft.name,
                                 tree=gen.tree_spec, plain_steps=lane.plain_steps)
        stats["batch_size"] = lane.largest_batch
        lane.result = OrtGenerationResult(tokens, gen.tokenizer.decode(tokens, skip_special_tokens=True), stats,
                                          lane.prompt)
        return lane
