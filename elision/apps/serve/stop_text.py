"""Stop strings in returned text, as OpenAI's API returns them: the completion ends before the first stop string.

The generation loop stops at the token that completes a stop string, so the generated text holds it (and whatever
else that token decoded to). `cut_at_stop` trims a whole text; `StopTextFilter` does the same to a stream of pieces,
holding back the end of the text while it could still be the start of a stop string.
"""
from __future__ import annotations

from typing import Sequence


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """(text before the first stop string, whether one was found)."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


class StopTextFilter:
    def __init__(self, stops: Sequence[str]):
        self.stops = list(stops)
        self.text = ""     # everything pushed so far
        self.emitted = 0   # characters of `text` already returned
        self.stopped = False

    def push(self, piece: str) -> str:
        """The text that can be sent now (possibly empty)."""
        if self.stopped:
            return ""
        self.text += piece
        kept, self.stopped = cut_at_stop(self.text, self.stops)
        safe = len(kept) if self.stopped else len(kept) - self._held_back(kept)
        out, self.emitted = self.text[self.emitted : max(safe, self.emitted)], max(safe, self.emitted)
        return out

    def finish(self) -> str:
        """The rest of the text once the generation ended (nothing after a stop string)."""
        kept, _ = cut_at_stop(self.text, self.stops)
        out, self.emitted = kept[self.emitted :], max(len(kept), self.emitted)
        return out

    def _held_back(self, text: str) -> int:
        """Length of the longest end of `text` that is a proper start of some stop string."""
        longest = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest
