"""README's figure of side-stream AlignIT on SD3 / Flux: the main stream, the side stream on p', and the
rows it writes at every block and step.

    python scripts/figure_mmdit.py      # writes assets/figures/mmdit_side_stream.png
"""
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyBboxPatch

OUT = Path(__file__).resolve().parents[1] / "assets" / "figures" / "mmdit_side_stream.png"

fig, ax = plt.subplots(figsize=(9, 3.6), dpi=110)
ax.set_xlim(0, 10.2)
ax.set_ylim(0, 4.6)
ax.axis("off")


def box(x, y, w, h, text, color, size=9):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.04", fc=color, ec="#333", lw=0.8))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size)


def arrow(x0, y0, x1, y1, color="#333", style="-|>"):
    ax.annotate("", (x1, y1), (x0, y0), arrowprops=dict(arrowstyle=style, color=color, lw=1.2))


# main stream: image tokens and p's text tokens, block after block
for k, x in enumerate((2.2, 5.1, 8.0)):
    box(x, 2.2, 1.9, 1.0, f"block {k}\njoint attention", "#e8eef7")
    box(x, 0.4, 1.9, 0.8, f"block {k}\ntext branch on p'", "#fbeee0", 8)
    arrow(x + 0.95, 1.2, x + 0.95, 2.2, "#c0392b")                        # rows written
    ax.text(x + 1.0, 1.68, "K,V rows of\nswapped positions", fontsize=7, color="#c0392b", va="center")
    arrow(x + 0.3, 2.2, x + 0.3, 1.2, "#2c7fb8")                           # image keys read
    if k < 2:
        arrow(x + 1.9, 2.7, x + 2.9, 2.7)
        arrow(x + 1.9, 0.8, x + 2.9, 0.8, "#a0522d")
ax.text(0.05, 2.7, "main stream\n[image ; text of p]\n(every row, both\nCFG halves)", fontsize=8, va="center")
ax.text(0.05, 0.8, "side stream\ntext of p'\n(base or customized\ntext branch, for the\nswapped row)", fontsize=8, va="center")
arrow(1.75, 2.7, 2.2, 2.7)
arrow(1.75, 0.8, 2.2, 0.8, "#a0522d")
ax.text(2.35, 1.68, "image\nK, V", fontsize=7, color="#2c7fb8", va="center", ha="left", rotation=0)
ax.text(5.1, 4.25, "Side-stream AlignIT on SD3 / Flux, at every block and step", ha="center", fontsize=11)
ax.text(5.1, 3.75, "the side stream attends to [its own text ; the main row's image keys and values]; nothing attends to it; "
        "its rows replace\np's rows at the swapped positions in the conditional half only", ha="center",
        fontsize=8, color="#444")
fig.savefig(OUT, bbox_inches="tight")
print(OUT)
