"""What a simulation's preference pairs teach: each pair classified by the colour rule against the picture.

    python -m bench.sim_pairs SIM_OUT

SIM_OUT is a `smolcord simulate --out` folder. Its store is exported the way `smolcord export`
exports it (on a copy: the voter-share cap, the eligibility rules, the held-out flag), each pair's
picture is read for the colour it shows (the one saturated colour on a grey background, matched to
the world's palette), and the pair is counted as `right>wrong` (the chosen answer names the right
colour and the rejected one does not: a pair that teaches the rule), `wrong>right` (the reverse),
`wrong>wrong` or `right>right` (no lesson about the rule: a vote flipped on one of two equally good
answers). Prints one JSON line. The baseline is a world without noise, where every pair is
`right>wrong` by construction.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path


def colour_shown(path: Path) -> str:
    import numpy as np
    from PIL import Image

    from smolcord.simulate.world import COLOURS

    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    saturated = pixels[(pixels.max(-1) - pixels.min(-1)) > 60]
    mean = saturated.mean(0)
    return min(COLOURS, key=lambda name: float(((mean - np.array(COLOURS[name])) ** 2).sum()))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sim_out", type=Path)
    args = parser.parse_args()

    from smolcord.simulate.world import colours_named

    with tempfile.TemporaryDirectory() as work:
        data = Path(work) / "data"
        shutil.copytree(args.sim_out / "data", data, ignore=shutil.ignore_patterns("adapters"))
        out = Path(work) / "pairs.jsonl"
        env = {**os.environ, "SMOLCORD_DATA_DIR": str(data)}
        subprocess.run(
            [sys.executable, "-m", "smolcord", "export", str(out)], env=env, check=True, capture_output=True
        )
        counts: Counter[str] = Counter()
        for line in out.read_text().splitlines():
            row = json.loads(line)
            truth = colour_shown(Path(row["images"][0]))
            chosen, rejected = (
                colours_named(row[side][0]["content"][0]["text"]) == {truth}
                for side in ("chosen", "rejected")
            )
            counts[f"{'right' if chosen else 'wrong'}>{'right' if rejected else 'wrong'}"] += 1
    total = sum(counts.values())
    print(json.dumps({"pairs": total, **{k: counts[k] for k in sorted(counts)},
                      "teaching_share": round(counts["right>wrong"] / total, 3) if total else None}))  # fmt: skip


if __name__ == "__main__":
    main()
