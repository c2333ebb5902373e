"""A self-contained flamegraph SVG (icicle: callers on top) from collapsed stacks.

py-spy can only write an SVG while it samples, and cputax samples in chrometrace format
(see `pyspy`), so the SVG is drawn here from the same stacks. Each box is coloured by
the category of the first rule that names its frame; the tooltip gives samples and share.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from xml.sax.saxutils import escape

WIDTH = 1200
ROW = 17
PAD = 10
HEADER = 40
MIN_WIDTH = 0.3  # px: narrower boxes are dropped (their time still counts in their parents)
CHAR_PX = 6.6

PALETTE = {
    "http": "#8fb5e8",
    "chat_template": "#f2b880",
    "tokenize": "#f28e5c",
    "preprocess": "#e8c77d",
    "ipc": "#b7a6e0",
    "schedule": "#9fd39b",
    "kv_cache": "#7cc6b6",
    "prefix_hash": "#5fb3a1",
    "model_execute": "#e57373",
    "gpu_wait": "#c9c9c9",
    "sample": "#f48fb1",
    "output_process": "#a5d6a7",
    "detokenize": "#ffb74d",
    "sse": "#90caf9",
    "metrics": "#bcaaa4",
    "kv_connector": "#80deea",
    "gc": "#fff176",
    "idle": "#eeeeee",
    None: "#dcdcdc",
}


@dataclass
class _Node:
    value: float = 0.0
    children: dict[str, _Node] = field(default_factory=dict)


def render_svg(
    stacks: Mapping[Sequence[str], float],
    title: str,
    category: Callable[[str], str | None] = lambda _: None,
) -> str:
    """`stacks`: frame labels (outermost first) -> weight; `category(label)` picks the colour."""
    root = _Node()
    for stack, weight in stacks.items():
        if weight <= 0:
            continue
        root.value += weight
        node = root
        for label in stack:
            node = node.children.setdefault(label, _Node())
            node.value += weight
    total = root.value or 1.0
    scale = (WIDTH - 2 * PAD) / total
    boxes: list[str] = []
    depth_max = 0

    def draw(node: _Node, x: float, depth: int) -> None:
        nonlocal depth_max
        for label, child in sorted(node.children.items()):
            w = child.value * scale
            if w >= MIN_WIDTH:
                depth_max = max(depth_max, depth)
                y = HEADER + depth * ROW
                tip = f"{label} — {child.value:,.0f} samples ({100 * child.value / total:.1f}%)"
                chars = int((w - 6) / CHAR_PX)
                text = (
                    label
                    if len(label) <= chars
                    else (label[: chars - 2] + ".." if chars > 3 else "")
                )
                boxes.append(
                    f'<g><title>{escape(tip)}</title><rect x="{x:.1f}" y="{y}" '
                    f'width="{w:.1f}" height="{ROW - 1}" '
                    f'fill="{PALETTE.get(category(label), PALETTE[None])}" rx="2"/>'
                    + (f'<text x="{x + 3:.1f}" y="{y + 12}">{escape(text)}</text>' if text else "")
                    + "</g>"
                )
                draw(child, x, depth + 1)
            x += w

    draw(root, PAD, 0)
    height = HEADER + (depth_max + 1) * ROW + PAD + 20
    legend = "".join(
        f'<tspan fill="{colour}">■</tspan> {escape(c)}  ' for c, colour in PALETTE.items() if c
    )
    return "\n".join(
        [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
            f'viewBox="0 0 {WIDTH} {height}" font-family="monospace" font-size="11">',
            '<rect width="100%" height="100%" fill="white"/>',
            f'<text x="{PAD}" y="18" font-size="14">{escape(title)} — {total:,.0f} samples</text>',
            (
                f'<text x="{PAD}" y="33" fill="#666">callers on top; colour = category of the '
                "frame's rule; hover for samples</text>"
            ),
            *boxes,
            f'<text x="{PAD}" y="{height - 8}" fill="#666" font-size="9">{legend}</text>',
            "</svg>",
        ]
    )
