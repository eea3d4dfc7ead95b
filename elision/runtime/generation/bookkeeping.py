"""What every decoding loop does around verification: append accepted tokens (EOS, length and stop-string
cuts), and the stats summary printed by `elision generate --json` and `elision run DIR --prompt --json`.

Both loops (torch: `elision.apps.specdec.generate`, onnxruntime: `elision.runtime.generation.ort_generator`) call these,
so their outputs and stats keys cannot drift apart.
"""
from __future__ import annotations

from typing import Any, Sequence


def normalize_eos(eos_token_id: int | Sequence[int] | None) -> set[int]:
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, int):
        return {int(eos_token_id)}
    return {int(e) for e in eos_token_id}


def check_lengths(longest: int, max_new_tokens: int, limit: int | None, overflow: type[Exception]) -> None:
    """Refuse a prompt that leaves no room before the model's position limit, or a request that runs past it
    (raised as `overflow`, the loop's cache-overflow error)."""
    if limit is None:
        return
    if longest >= limit:
        raise ValueError(f"prompt of {longest} tokens is too long: the model's position limit is {limit}; "
                         "shorten the prompt to leave room for generated tokens")
    if longest + max_new_tokens > limit:
        raise overflow(f"cache overflow: a {longest}-token prompt plus max_new_tokens={max_new_tokens} exceeds the "
                       f"model's position limit of {limit}; lower max_new_tokens to at most {limit - longest}")


def append_tokens(b: int, new: Sequence[int], outputs: list[list[int]], contexts: list[list[int]], active: list[bool],
                  eos: set[int], stops: Sequence[str], max_new_tokens: int, tokenizer: Any) -> None:
    """Append accepted tokens to sequence b, cutting at EOS, max_new_tokens or a stop string.

    `tokenizer` needs only `decode(ids)` (a Hugging Face tokenizer or a `tokenizers.Tokenizer`).
    """
    for tok in new:
        outputs[b].append(tok)
        contexts[b].append(tok)
        done = tok in eos or len(outputs[b]) >= max_new_tokens
        if not done and stops:
            tail = tokenizer.decode(outputs[b][-(max(len(s) for s in stops) + 4) :])
            done = any(s in tail for s in stops)
        if done:
            active[b] = False
            return


def generation_stats(*, outputs: list[list[int]], accepted_lengths: list[list[int]], tree_sizes: list[int],
                     steps: int, total_s: float, timing: dict[str, float], draft_forward_passes: int,
                     drafter: str, tree: str, plain_steps: int = 0) -> dict[str, Any]:
    """The stats dict of one generate call (keys shared by every loop and CLI).

    `total_s` is everything the caller paid after loading (a cost curve measured during the call included), so
    tokens_per_s is what a user sees; `timing` holds the named phases (prefill_s, cost_curve_s, draft_s, verify_s,
    accept_s) and the remainder is the loop's own overhead (`time_s["loop_s"]`, and per verification step in
    `per_step_s["loop"]`).
    """
    n_new = sum(len(o) for o in outputs)
    flat = [x for acc in accepted_lengths for x in acc]
    loop_s = max(0.0, total_s - sum(timing.values()))
    per_step = {k: (timing.get(f"{k}_s", 0.0) / steps if steps else 0.0) for k in ("draft", "verify", "accept")}
    per_step["loop"] = loop_s / steps if steps else 0.0
    return dict(
        tokens_per_s=n_new / total_s if total_s > 0 else float("inf"),
        new_tokens=n_new,
        # target forwards of this generation: prefill + one per verification step
        forward_passes=steps + 1,
        verify_steps=steps,
        plain_steps=plain_steps,  # of verify_steps: one-token steps without a tree (drafter "none", or the gate's)
        mean_accepted_length=(sum(flat) / len(flat)) if flat else 0.0,
        per_sequence_accepted_length=[(sum(a) / len(a)) if a else 0.0 for a in accepted_lengths],
        mean_tree_size=(sum(tree_sizes) / len(tree_sizes)) if tree_sizes else 0.0,
        draft_forward_passes=draft_forward_passes,
        drafter=drafter,
        tree=tree,
        batch_size=len(outputs),
        time_s=dict(total=total_s, **timing, loop_s=loop_s),
        per_step_s=per_step,
    )


class IncrementalDecoder:
    """Turns a growing list of token ids into the text to print next (for streaming to a terminal).

    Decodes everything so far and returns only the new suffix, holding text back while it ends in an incomplete
    UTF-8 sequence (byte-level BPE splits multi-byte characters across tokens).
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.printed = 0

    def _decode(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def push(self, tokens: Sequence[int]) -> str:
        self.tokens.extend(int(t) for t in tokens)
        text = self._decode()
        if text.endswith("\ufffd"):
            return ""
        piece, self.printed = text[self.printed :], len(text)
        return piece

    def finish(self) -> str:
        text = self._decode()
        piece, self.printed = text[self.printed :], len(text)
        return piece
