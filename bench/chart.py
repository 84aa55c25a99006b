"""A PNG chart of one run: every target row as a share of its target (matplotlib, Agg backend).

Each bar is the row's score: measured value / target threshold, oriented so that 1.0 is exactly at
the target and more is better (for latency and memory the inverse ratio). Bars are green when the
row is met, red when not; rows without a target or a measurement are left out.
"""

from __future__ import annotations

from pathlib import Path

from .targets import Verdict


def render(verdicts: list[Verdict], title: str, path: Path) -> bool:
    """Write the chart; False (and a message) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: write files only
        import matplotlib.pyplot as plt
    except ImportError:
        print("chart skipped: matplotlib missing (pip install -e '.[bench]')")
        return False
    shown = [v for v in verdicts if v.score is not None and v.met is not None]
    if not shown:
        return False
    cap = 4.0  # keep one huge score from squashing the rest; the label shows the real value
    labels = [f"{v.row}\n{v.ratio if v.ratio != '-' else v.ours.split(' (')[0]}" for v in shown]
    scores = [min(v.score or 0.0, cap) for v in shown]
    colors = ["#2e7d32" if v.met else "#c62828" for v in shown]
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(shown) + 1.6), dpi=110)
    y = list(range(len(shown)))[::-1]
    ax.barh(y, scores, color=colors, height=0.6)
    ax.axvline(1.0, color="black", linewidth=1.2, linestyle="--", label="target")
    ax.legend(loc="lower right", fontsize=8)
    for yi, v, s in zip(y, shown, scores, strict=True):
        ax.text(s + 0.03, yi, f"{v.score:.2f}x", va="center", fontsize=8)
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlim(0, cap + 0.4)
    ax.set_xlabel("measured / target (>= 1 meets it; ratios are to the socks-danted ceiling)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True
