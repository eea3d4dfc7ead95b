"""Split calibration rows into a tune part and a held-out part that share no row.

`elision tune` chooses a plan on the tune part and reports its fidelity on the held-out part too: a plan fitted to
its calibration text measures higher there than on text it never saw, and the user should see both numbers.
"""
from __future__ import annotations

import torch


def _row_keys(inputs: tuple[torch.Tensor, ...]) -> list[bytes]:
    """One hashable key per row: the bytes of that row in every input tensor."""
    return [b"".join(x[i].contiguous().numpy().tobytes() for x in inputs) for i in range(inputs[0].shape[0])]


def split_rows(inputs: tuple[torch.Tensor, ...], labels: torch.Tensor | None, tune_rows: int):
    """(tune inputs, tune labels, held-out inputs or None, held-out labels or None): the first `tune_rows` rows
    tune; the rest are held out, less any row equal to a tune row (or to an earlier held-out row)."""
    tune = tuple(x[:tune_rows] for x in inputs)
    tune_labels = labels[:tune_rows] if labels is not None else None
    seen = set(_row_keys(tune))
    keep = []
    for i, key in enumerate(_row_keys(tuple(x[tune_rows:] for x in inputs))):
        if key not in seen:
            seen.add(key)
            keep.append(tune_rows + i)
    if not keep:
        return tune, tune_labels, None, None
    index = torch.tensor(keep)
    held = tuple(x[index] for x in inputs)
    return tune, tune_labels, held, (labels[index] if labels is not None else None)
