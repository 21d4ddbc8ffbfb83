"""How a training run reports: JSON lines for the bot, a progress bar for a person, or words only."""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

__all__ = ["RunOutput", "describe_data", "progress_callback"]


class RunOutput:
    """Where a run reports: JSON lines on stdout (`json`), a tqdm bar on stderr (`bar`), or words only."""

    def __init__(self, mode: str, stdout: TextIO) -> None:
        if mode not in ("json", "bar", "none"):
            raise ValueError(f"progress must be json, bar or none, not {mode!r}")
        self.mode, self.stdout, self._bar = mode, stdout, None

    def start(self, total: int) -> None:
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc="training", unit="step", file=sys.stderr)

    def progress(self, step: int, total: int, loss: float) -> None:
        if self.mode == "json":
            self._line({"step": step, "total": total, "loss": round(loss, 6)})
        elif self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(loss=f"{loss:.4f}")

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def say(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    def finish(self, exit_code: int, verdict: str, message: str, **fields: Any) -> int:
        self.stop()
        if self.mode == "json":
            self._line({"verdict": verdict, "exit_code": exit_code, "message": message, **fields})
        else:
            print(f"{verdict}: {message}", file=self.stdout, flush=True)
            for name in ("report", "worker"):
                if fields.get(name):
                    print(f"  {name}: {fields[name]}", file=self.stdout, flush=True)
        return exit_code

    def _line(self, record: dict[str, Any]) -> None:
        self.stdout.write(json.dumps(record, default=str) + "\n")
        self.stdout.flush()


def describe_data(summary: dict[str, Any]) -> str:
    """One line for people: what a run trains on."""
    unit = "rated answers" if summary["method"] == "kto" else "pairs"
    trained = summary.get("train_pairs", summary.get("train_answers", 0))
    liked = (
        f" (after {summary['train_liked_answers']} liked answers)" if "train_liked_answers" in summary else ""
    )
    tokens = summary["tokens"]
    return (
        f"{trained} {unit}{liked} to train on, {summary['heldout_pairs']} held-out pairs, "
        f"{summary['dropped_too_long']} dropped as longer than {summary['token_limit']} tokens, "
        f"{summary['missing_images']} with missing images, {summary['images']} images, "
        f"tokens min/median/max {tokens['min']}/{tokens['median']}/{tokens['max']}"
    )


def progress_callback(out: RunOutput) -> Any:
    """A TrainerCallback that reports each optimizer step's loss to `out`."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            out.start(state.max_steps)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:
                out.progress(state.global_step, state.max_steps, float(logs["loss"]))

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            out.stop()

    return Progress()
