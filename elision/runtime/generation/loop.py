"""The draft -> verify -> accept -> commit loop, written once for every backend (a `TreeSession`).

    outcome = decode(session, prompts, drafter, DecodeOptions(max_new_tokens=64, ...))
    outcome.outputs, outcome.stats

Per step: the drafter proposes a tree per active sequence (a static template, or a dynamic best-first tree sized
from the verification-cost curve) -> one `session.extend` over all trees -> greedy verification, or lossless
rejection sampling -> stop handling (EOS, length, stop strings) -> the drafter observes the verified logits ->
`session.commit` keeps the root and the accepted nodes. The torch loop (`elision.apps.specdec.generate`, over a
`KVSession`) and the onnxruntime loop (`elision.runtime.generation.ort_generator`) both call `decode`; they differ
only in the session and in how logits rows become numpy (`to_numpy`).

A drafter that never proposes (`none`) runs *plain* steps instead: one token per sequence through
`session.extend_chains`, no trees, drafting or drafter feedback. With `speculation_gate` (the ONNX Runtime loop's
dynamic trees, alone or continuously batched), a `SpeculationGate` also switches to plain steps while speculation
measures slower than them, judged by the tokens per second each sequence of the forward gets (so a batch that
grows or shrinks between phases does not pass for a faster kind of step).

`DecodeBatch` is that loop as an object stepped from outside: `decode` starts every sequence at once and steps
until all are done; continuous batching (`elision.runtime.generation.continuous`) lets sequences `join` (each
prefilled alone into the next free session row) and `leave` (the last row moves into the hole, so a forward only
ever covers the leading rows) between steps. Each sequence has its own length limit, EOS ids, stop strings and
sampling options (`SequenceOptions`); drafter state is kept per *slot* (a sequence's stable index), the session
per *row* (its place in the forward).

Time is split into phases in the stats (`time_s`): prefill, cost_curve (a curve measured during this call),
draft, verify (the model forward), accept (verification, bookkeeping, drafter feedback, cache commit) and loop
(everything else after the session was created: the loop's own overhead). tokens/s counts all of them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from elision.runtime.generation.bookkeeping import append_tokens, generation_stats
from elision.runtime.generation.drafters import Drafter
from elision.runtime.generation.sampling import ProcessedRows, SamplingConfig, Uniform, sample_token, target_probs, verify_sampling
from elision.runtime.generation.session import TreeSession
from elision.runtime.generation.speculation_gate import SpeculationGate
from elision.runtime.generation.tree import TokenTree
from elision.runtime.generation.tree_builders import StaticTemplate, VerifyCostCurve, build_dynamic, build_static, choose_tree_size
from elision.runtime.generation.verify import verify_greedy

__all__ = ["DecodeBatch", "DecodeOptions", "DecodeOutcome", "SequenceOptions", "decode"]


@dataclass
class SequenceOptions:
    """What each sequence of a batch decides for itself."""

    max_new_tokens: int
    eos: set[int] = field(default_factory=set)
    stops: Sequence[str] = ()
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    uniform: Uniform | None = None  # the random source when sampling


@dataclass
class DecodeOptions:
    max_new_tokens: int
    eos: set[int] = field(default_factory=set)
    stops: Sequence[str] = ()
    tokenizer: Any = None  # needs `decode(ids)` when there are stop strings
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    uniform: Uniform | None = None  # the random source when sampling
    template: StaticTemplate | None = None  # None: dynamic trees sized by the cost curve
    tree_name: str = "dynamic"
    max_tree_size: int = 32
    max_depth: int = 16
    # the cost curve for dynamic trees: given, or measured on the live session after prefill (timed as cost_curve)
    cost_curve: VerifyCostCurve | Callable[[TreeSession], VerifyCostCurve] | None = None
    to_numpy: Callable[[Any], np.ndarray] = np.asarray  # one logits row -> numpy (torch: off the device)
    on_tokens: Callable[[int, list[int]], None] | None = None  # sequence b accepted these tokens (streaming)
    on_step: Callable[[int, TokenTree, list[int], int], None] | None = None  # (b, tree, accepted path, bonus)
    # fall back to plain one-token steps while speculation measures slower than them (`SpeculationGate`)
    speculation_gate: bool = False

    def sequence(self) -> SequenceOptions:
        """These options for one sequence (`decode` gives every sequence the same ones, one random source)."""
        return SequenceOptions(self.max_new_tokens, self.eos, self.stops, self.sampling, self.uniform)


@dataclass
class DecodeOutcome:
    outputs: list[list[int]]
    stats: dict


class DecodeBatch:
    """Sequences decoded together over one session: `start` or `join` them, `step` until none is `active`."""

    def __init__(self, session: TreeSession, draft: Drafter, opts: DecodeOptions, slots: int):
        self.session, self.draft, self.opts = session, draft, opts
        self.seqs: list[SequenceOptions | None] = [None] * slots
        self.outputs: list[list[int]] = [[] for _ in range(slots)]
        self.contexts: list[list[int]] = [[] for _ in range(slots)]
        self.active = [False] * slots
        self.accepted: list[list[int]] = [[] for _ in range(slots)]  # tokens gained per step, per slot
        self.rows: list[int] = []  # the slot in each leading session row: the rows every forward covers
        self.timing = dict(prefill_s=0.0, cost_curve_s=0.0, draft_s=0.0, verify_s=0.0, accept_s=0.0)
        self.tree_sizes: list[int] = []
        self.steps = 0
        self.curve: VerifyCostCurve | None = None  # sizes dynamic trees; None: the drafter's whole budget
        self.proposes = getattr(draft, "proposes", True)  # a duck-typed drafter (any object with `children`) does
        self.gate = SpeculationGate() if opts.speculation_gate and self.proposes else None
        self.plain_steps = 0
        self.stepping_plain = False  # the kind of the step under way (continuous batching counts it per request)

    def start(self, prompts: list[list[int]], seqs: list[SequenceOptions]) -> None:
        """Every sequence at once, slot b in row b, prefilled in one forward (a fresh session)."""
        clock = time.perf_counter
        t0 = clock()
        logits = self.session.prefill(prompts)
        first = [self._first_token(logits[b, len(p) - 1], seq) for b, (p, seq) in enumerate(zip(prompts, seqs))]
        self.timing["prefill_s"] += clock() - t0
        self.rows = list(range(len(prompts)))
        for b, (p, seq) in enumerate(zip(prompts, seqs)):
            self._begin(b, p, seq, first[b])
        t0 = clock()
        self.draft.reset(self.contexts[: len(prompts)], logits)
        self.timing["draft_s"] += clock() - t0

    def join(self, slot: int, prompt: list[int], seq: SequenceOptions) -> None:
        """One more sequence in a free `slot`, prefilled alone into the next free session row."""
        clock = time.perf_counter
        t0 = clock()
        logits = self.session.prefill([prompt], first=len(self.rows))
        first = self._first_token(logits[0, len(prompt) - 1], seq)
        self.timing["prefill_s"] += clock() - t0
        self.rows.append(slot)
        self._begin(slot, prompt, seq, first)
        t0 = clock()
        self.draft.admit(slot, self.contexts[slot], logits[0])
        self.timing["draft_s"] += clock() - t0

    def leave(self, slot: int) -> None:
        """Take `slot` out of the forwards (done or cancelled): the last row moves into its row."""
        row, last = self.rows.index(slot), len(self.rows) - 1
        if row != last:
            self.session.move(last, row)
            self.rows[row] = self.rows[last]
        self.rows.pop()
        self.active[slot] = False
        self.seqs[slot] = None

    def _first_token(self, row_logits, seq: SequenceOptions) -> int:
        if not seq.sampling.do_sample:
            return int(row_logits.argmax())
        return sample_token(target_probs(self.opts.to_numpy(row_logits), seq.sampling), seq.uniform)

    def _begin(self, slot: int, prompt: list[int], seq: SequenceOptions, first: int) -> None:
        self.seqs[slot] = seq
        self.outputs[slot], self.contexts[slot], self.accepted[slot] = [], list(prompt), []
        self.active[slot] = True
        self._append(slot, [first])
        if self.opts.on_tokens is not None:
            self.opts.on_tokens(slot, list(self.outputs[slot]))

    def _append(self, slot: int, tokens: list[int]) -> None:
        seq = self.seqs[slot]
        append_tokens(slot, tokens, self.outputs, self.contexts, self.active, seq.eos, seq.stops, seq.max_new_tokens,
                      self.opts.tokenizer)

    def _trees(self, max_depth: list[int]) -> list[TokenTree | None]:
        opts, draft, contexts, active = self.opts, self.draft, self.contexts, self.active
        trees: list[TokenTree | None] = []
        for b in self.rows:
            if not active[b]:
                trees.append(None)
            elif opts.template is not None:
                trees.append(build_static(draft, b, contexts[b], opts.template, max_depth[b]))
            else:
                trees.append(build_dynamic(draft, b, contexts[b], opts.max_tree_size, max_depth[b]))
        if self.curve is not None and any(t is not None and len(t) > 1 for t in trees):
            n = choose_tree_size(trees, self.curve, opts.max_tree_size)
            trees = [t.truncate(n) if t is not None else None for t in trees]
        return trees

    def step(self) -> None:
        """One forward over every active sequence in the session's leading rows: a speculative step over drafted
        trees, or a plain one-token step when the drafter never proposes or the gate says speculation loses now."""
        self.stepping_plain = not (self.proposes and (self.gate is None or self.gate.speculate()))
        if self.stepping_plain:
            self._plain_step()
        else:
            self._tree_step()

    def _tree_step(self) -> None:
        clock = time.perf_counter
        opts, draft, outputs, contexts, active, seqs = (self.opts, self.draft, self.outputs, self.contexts,
                                                        self.active, self.seqs)
        t0 = clock()
        max_depth = [min(opts.max_depth, s.max_new_tokens - len(o) - 1) if a else 0
                     for o, a, s in zip(outputs, active, seqs)]
        draft.prepare(contexts, active, max_depth)
        trees = self._trees(max_depth)
        t1 = clock()
        logits = self.session.extend(trees)
        t2 = clock()
        self.steps += 1
        keep: list[list[int]] = [[] for _ in trees]
        gained = 0
        greedy_rows = any(t is not None and not seqs[b].sampling.do_sample for b, t in zip(self.rows, trees))
        argmax = logits.argmax(-1).tolist() if greedy_rows else None
        for row, (b, t) in enumerate(zip(self.rows, trees)):
            if t is None:
                continue
            n = len(t)
            self.tree_sizes.append(n)
            seq = seqs[b]
            if not seq.sampling.do_sample:
                path, bonus = verify_greedy(t, argmax[row])
            else:
                rows = ProcessedRows(lambda i, row=row: opts.to_numpy(logits[row, i]), seq.sampling)
                path, bonus = verify_sampling(t, rows, seq.uniform)
            keep[row] = path
            before = len(outputs[b])
            self._append(b, [t.tokens[i] for i in path[1:]] + [bonus])
            self.accepted[b].append(len(outputs[b]) - before)
            gained += len(outputs[b]) - before
            draft.observe(b, t, logits[row, :n], path, contexts[b])
            if opts.on_step is not None:
                opts.on_step(b, t, path, bonus)
            if opts.on_tokens is not None:
                opts.on_tokens(b, outputs[b][before:])
        self._close_step(keep, True, gained, t0, t1, t2)

    def _plain_step(self) -> None:
        """Every active sequence takes its next token from one forward over its pending root alone: what a
        speculative step over root-only trees commits (greedy: the argmax; sampling: `verify_sampling`'s draw from
        the root's distribution, the same uniforms), without drafting, trees or drafter feedback."""
        clock = time.perf_counter
        opts, outputs, contexts, seqs = self.opts, self.outputs, self.contexts, self.seqs
        t0 = clock()
        chains = [[contexts[b][-1]] if self.active[b] else [] for b in self.rows]
        t1 = clock()
        logits = self.session.extend_chains(chains)
        t2 = clock()
        self.steps += 1
        self.plain_steps += 1
        greedy_rows = any(c and not seqs[b].sampling.do_sample for b, c in zip(self.rows, chains))
        argmax = logits[:, 0].argmax(-1).tolist() if greedy_rows else None
        keep: list[list[int]] = []
        gained = 0
        for row, (b, chain) in enumerate(zip(self.rows, chains)):
            if not chain:
                keep.append([])
                continue
            keep.append([0])
            self.tree_sizes.append(1)
            seq = seqs[b]
            if not seq.sampling.do_sample:
                bonus = argmax[row]
            else:
                rows = ProcessedRows(lambda i, row=row: opts.to_numpy(logits[row, i]), seq.sampling)
                _, bonus = verify_sampling(TokenTree.root(chain[0]), rows, seq.uniform)
            before = len(outputs[b])
            self._append(b, [bonus])
            self.accepted[b].append(len(outputs[b]) - before)
            gained += len(outputs[b]) - before
            if opts.on_step is not None:
                opts.on_step(b, TokenTree.root(chain[0]), [0], bonus)
            if opts.on_tokens is not None:
                opts.on_tokens(b, outputs[b][before:])
        self._close_step(keep, False, gained, t0, t1, t2)

    def _close_step(self, keep: list[list[int]], speculative: bool, gained: int, t0: float, t1: float,
                    t2: float) -> None:
        """Commit the kept paths and book the step's phases (t0 drafting starts, t1 verify starts, t2 accept
        starts) and, for the gate, the tokens it gained per sequence of the forward over the whole step."""
        self.session.commit(keep)
        t3 = time.perf_counter()
        self.timing["draft_s"] += t1 - t0
        self.timing["verify_s"] += t2 - t1
        self.timing["accept_s"] += t3 - t2
        if self.gate is not None:
            self.gate.record(speculative, gained / max(1, len(keep)), t3 - t0)


def decode(session: TreeSession, prompts: list[list[int]], draft: Drafter, opts: DecodeOptions,
           started: float | None = None) -> DecodeOutcome:
    """Generate up to `opts.max_new_tokens` tokens for every prompt (a fresh `session` sized for them).

    `started` (a `time.perf_counter()` reading) is when the caller's work for this request began, so checking
    the request and creating the session count too; default: now.
    """
    t_start = time.perf_counter() if started is None else started
    n_seq = len(prompts)
    batch = DecodeBatch(session, draft, opts, n_seq)
    seq = opts.sequence()
    batch.start(prompts, [seq] * n_seq)
    curve = opts.cost_curve
    if opts.template is not None or not any(batch.active):
        curve = None
    elif callable(curve):
        t0 = time.perf_counter()
        curve = curve(session)
        batch.timing["cost_curve_s"] = time.perf_counter() - t0
    batch.curve = curve
    while any(batch.active):
        batch.step()
    stats = generation_stats(outputs=batch.outputs, accepted_lengths=batch.accepted, tree_sizes=batch.tree_sizes,
                             steps=batch.steps, total_s=time.perf_counter() - t_start, timing=batch.timing,
                             draft_forward_passes=draft.draft_forward_passes, drafter=draft.name, tree=opts.tree_name,
                             plain_steps=batch.plain_steps)
    return DecodeOutcome(batch.outputs, stats)
