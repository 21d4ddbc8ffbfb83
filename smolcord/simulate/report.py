"""The simulation's picture: the evaluation 👍 share round by round, with the promotions marked."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["write_report"]


def write_report(path: Path, rounds: Sequence[dict[str, Any]], *, title: str) -> Path:
    """Draw `report.png`: the rule's 👍 share (and colour and shape right) per round; promotions marked."""
    import matplotlib

    matplotlib.use("Agg")  # no display: the report is a file
    import matplotlib.pyplot as plt

    numbers = [r["round"] for r in rounds]
    figure, axes = plt.subplots(figsize=(8, 4.5), layout="constrained")
    axes.plot(
        numbers,
        [r["eval_up_share"] for r in rounds],
        "o-",
        color="tab:blue",
        label="liked by the rule (up share)",
    )
    axes.plot(numbers, [r["eval_colour_share"] for r in rounds], ":", color="tab:red", label="colour right")
    axes.plot(numbers, [r["eval_shape_share"] for r in rounds], ":", color="tab:green", label="shape right")
    for record in rounds:
        if record.get("promoted"):
            axes.axvline(record["round"], color="tab:orange", alpha=0.35, lw=6)
            axes.annotate(
                f"{record.get('candidate')} promoted", (record["round"], 0.02), rotation=90,
                ha="right", va="bottom", fontsize=8, color="tab:orange",
            )  # fmt: skip
        elif record.get("trained"):
            axes.annotate(
                "rejected", (record["round"], 0.02), rotation=90, ha="right", va="bottom", fontsize=8
            )
    axes.axhline(0.8, color="grey", ls="--", lw=0.8)
    axes.set(xlabel="round (night)", ylabel="share of evaluation answers", ylim=(0, 1.02), title=title)
    axes.set_xticks(numbers)
    axes.legend(loc="upper left", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
