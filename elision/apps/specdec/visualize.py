"""Pictures of a draft tree and the branch the target accepted (PNG via matplotlib, or standalone HTML/SVG).

Nodes are laid out by depth (x) and depth-first leaf order (y). The accepted path is green, drafted but
rejected nodes are grey, and the bonus token the target produced after the last accepted node is drawn
dashed. Each node shows its token (decoded when a tokenizer is given) and its estimated path probability.
"""
from __future__ import annotations

import html
from pathlib import Path

from elision.apps.specdec.generate import GenerationResult, StepRecord

ACCEPTED = "#2e9d4f"
REJECTED = "#b0b0b0"
BONUS = "#1f6fd1"


def _label(token: int, tokenizer) -> str:
    if tokenizer is None:
        return str(token)
    # the token's own string (byte-level BPE pieces decode to U+FFFD one at a time)
    text = tokenizer.convert_ids_to_tokens(int(token)) if hasattr(tokenizer, "convert_ids_to_tokens") else None
    if not isinstance(text, str):
        text = tokenizer.decode([token])
    return repr(text)[1:-1][:12] or str(token)


def _layout(record: StepRecord) -> dict[int, tuple[float, float]]:
    tree = record.tree
    kids: dict[int, list[int]] = {i: [] for i in range(len(tree))}
    for i in range(1, len(tree)):
        kids[tree.parents[i]].append(i)
    pos: dict[int, tuple[float, float]] = {}
    next_row = [0.0]

    def place(node: int) -> float:
        if not kids[node]:
            y = next_row[0]
            next_row[0] += 1.0
        else:
            ys = [place(c) for c in kids[node]]
            y = sum(ys) / len(ys)
        pos[node] = (float(tree.depths[node]), y)
        return y

    place(0)
    return pos


def pick_step(result: GenerationResult, step: int | None = None) -> StepRecord:
    if not result.steps:
        raise ValueError("no recorded steps: call generate(..., record_trees=True) and generate at least 2 tokens")
    if step is not None:
        if not 0 <= step < len(result.steps):
            raise ValueError(f"step {step} out of range: {len(result.steps)} steps were recorded")
        return result.steps[step]
    # the most informative picture: most tokens accepted, then the biggest tree
    return max(result.steps, key=lambda r: (len(r.accepted), len(r.tree)))


def render_tree(record: StepRecord, path: str | Path, tokenizer=None) -> Path:
    """Write the tree of one verification step to `path` (.png or .html)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".png":
        _render_png(record, path, tokenizer)
    elif suffix in (".html", ".htm"):
        path.write_text(_render_html(record, tokenizer))
    else:
        raise ValueError(f"cannot write a tree picture to {path.name!r}: use a .png or .html file name")
    return path


def _render_png(record: StepRecord, path: Path, tokenizer) -> None:
    import matplotlib  # only plots need it (pyplot costs a noticeable part of a second to import)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no display needed

    tree = record.tree
    pos = _layout(record)
    accepted = set(record.accepted)
    last = record.accepted[-1]
    bonus_xy = (pos[last][0] + 1, pos[last][1])
    rows = max(y for _, y in pos.values()) + 1
    fig, ax = plt.subplots(figsize=(2.0 + 1.6 * (tree.max_depth() + 2), 1.0 + 0.45 * rows))
    for i in range(1, len(tree)):
        (x0, y0), (x1, y1) = pos[tree.parents[i]], pos[i]
        color = ACCEPTED if i in accepted else REJECTED
        ax.plot([x0, x1], [y0, y1], color=color, lw=2.5 if i in accepted else 1.0, zorder=1)
    ax.plot([pos[last][0], bonus_xy[0]], [pos[last][1], bonus_xy[1]], color=BONUS, ls="--", lw=2, zorder=1)
    for i, (x, y) in pos.items():
        color = ACCEPTED if i in accepted else REJECTED
        text = _label(tree.tokens[i], tokenizer) + ("" if i == 0 else f"\n{tree.scores[i]:.2f}")
        ax.text(x, y, text, ha="center", va="center", fontsize=8, zorder=2,
                bbox=dict(boxstyle="round", fc="white", ec=color, lw=2 if i in accepted else 1))
    ax.text(*bonus_xy, _label(record.bonus, tokenizer) + "\nbonus", ha="center", va="center", fontsize=8,
            bbox=dict(boxstyle="round", fc="white", ec=BONUS, ls="--"))
    ax.set_title(f"sequence {record.sequence}: {len(tree)} nodes, accepted {len(record.accepted) - 1} + bonus")
    ax.set_xlim(-0.6, bonus_xy[0] + 0.6)
    ax.set_ylim(rows - 0.4, -0.6)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _render_html(record: StepRecord, tokenizer) -> str:
    tree = record.tree
    pos = _layout(record)
    accepted = set(record.accepted)
    last = record.accepted[-1]
    sx, sy, pad = 120, 44, 40
    bonus_xy = (pos[last][0] + 1, pos[last][1])

    def xy(p):
        return pad + p[0] * sx, pad + p[1] * sy

    width = int(pad * 2 + (tree.max_depth() + 1) * sx)
    height = int(pad * 2 + (max(y for _, y in pos.values())) * sy)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="monospace" font-size="11">']
    for i in range(1, len(tree)):
        (x0, y0), (x1, y1) = xy(pos[tree.parents[i]]), xy(pos[i])
        color = ACCEPTED if i in accepted else REJECTED
        parts.append(f'<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y1}" stroke="{color}" stroke-width="{3 if i in accepted else 1}"/>')
    (x0, y0), (x1, y1) = xy(pos[last]), xy(bonus_xy)
    parts.append(f'<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y1}" stroke="{BONUS}" stroke-dasharray="5,3" stroke-width="2"/>')
    nodes = [(i, pos[i], _label(tree.tokens[i], tokenizer), ACCEPTED if i in accepted else REJECTED,
              "root" if i == 0 else f"p={tree.scores[i]:.2f}") for i in range(len(tree))]
    nodes.append((-1, bonus_xy, _label(record.bonus, tokenizer), BONUS, "bonus"))
    for _, p, label, color, note in nodes:
        x, y = xy(p)
        parts.append(f'<rect x="{x - 45}" y="{y - 15}" width="90" height="30" rx="6" fill="white" stroke="{color}" stroke-width="2"/>')
        parts.append(f'<text x="{x}" y="{y - 2}" text-anchor="middle">{html.escape(label)}</text>')
        parts.append(f'<text x="{x}" y="{y + 11}" text-anchor="middle" fill="#666" font-size="9">{html.escape(note)}</text>')
    parts.append("</svg>")
    title = f"Draft tree, sequence {record.sequence}: {len(tree)} nodes, {len(record.accepted) - 1} accepted + bonus"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
            f"<body><h3>{html.escape(title)}</h3>"
            f"<p><span style='color:{ACCEPTED}'>accepted path</span> / <span style='color:{REJECTED}'>rejected</span> / "
            f"<span style='color:{BONUS}'>bonus token from the target</span></p>{''.join(parts)}</body></html>")
