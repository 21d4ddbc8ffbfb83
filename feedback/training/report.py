"""The PNG report of a training run: loss, reward accuracy and margin over steps, and the gate's comparison."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["write_report"]

# (log key, panel title) of the per-step curves; trl's DPO and KTO trainers both log these keys
# (KTO logs no accuracy, so its panel stays empty with a note).
_CURVES = (
    ("loss", "loss"),
    ("rewards/accuracies", "reward accuracy (train batches)"),
    ("rewards/margins", "reward margin (train batches)"),
)


def write_report(
    path: Path,
    *,
    title: str,
    history: Sequence[dict[str, Any]],
    heldout: dict[str, dict[str, Any]],
    verdict: str,
) -> Path:
    """Draw the report to `path` (PNG). heldout: {label: {"accuracy": a, "mean_margin": m}} per model."""
    import matplotlib

    matplotlib.use("Agg")  # no display: runs on servers and in the bot's child process
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    for ax, (key, name) in zip(axes[:3], _CURVES, strict=True):
        points = [(h["step"], h[key]) for h in history if key in h and "step" in h]
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="." if len(points) < 40 else None)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)

    ax = axes[3]
    labels = list(heldout)
    accuracy = [heldout[k].get("accuracy") or 0.0 for k in labels]
    margin = [heldout[k].get("mean_margin") or 0.0 for k in labels]
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], accuracy, width=0.4, label="accuracy (ties ½)")
    ax.bar([x + 0.2 for x in xs], margin, width=0.4, label="mean margin")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(list(xs), labels)
    pairs = next((v.get("pairs") for v in heldout.values() if v.get("pairs") is not None), 0)
    ax.set_title(f"held-out ({pairs} pairs)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")

    fig.suptitle(f"{title}: {verdict}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
