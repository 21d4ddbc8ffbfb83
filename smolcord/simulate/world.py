"""The simulated world: drawn images whose attributes are known, questions about them, and users voting by a rule.

Everything is seeded and deterministic, and torch-free (Pillow and numpy):

- `World(seed).scenes(count, round=r)` draws fresh images for round r (a shape of a colour on a grey
  background, with per-pixel noise), each with a question; `World(seed).evaluation_set(count)` is the
  fixed evaluation set: the same every round for a seed, balanced over colours and shapes, and never
  one of the training images (they come from disjoint image ids).
- The rules are pure functions of (answer text, ground truth): `colour` (👍 iff the answer names the true
  colour and no other colour), `shape` (the same for the shape), `short` (👍 iff fewer than SHORT_WORDS
  words and `colour` or `shape` holds), `random` (a fair coin from the voter's own RNG).
- `SimulatedUser`s vote by the rule, flip a vote with probability `noise`, and press 🔁 on an answer
  they dislike with probability `regenerate`.

The rules read words, not substrings: "Reddish" names no colour, "red or blue" names two, "RED!" names
red. The vocabularies are wider than the world's own colours and shapes, so an answer that names a
colour or shape the world never draws ("purple", "a heart") is wrong, not ignored.
"""

from __future__ import annotations

import io
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import product
from typing import Any

__all__ = [
    "COLOURS",
    "QUESTIONS",
    "RULES",
    "SHAPES",
    "SHORT_WORDS",
    "Layout",
    "Scene",
    "SimulatedUser",
    "Truth",
    "World",
    "canary_community",
    "colour_rule",
    "colours_named",
    "community",
    "contrary_rule",
    "describe",
    "draw",
    "judge",
    "shape_rule",
    "shapes_named",
    "short_rule",
]

# Far apart in hue and away from the grey backgrounds, so a random vision encoder tells them apart.
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 205, 40)}
SHAPES = ("circle", "square", "triangle", "star")
QUESTIONS = (
    "What colour is the shape?",
    "Which colour do you see?",
    "What shape is this?",
    "Which shape is in the picture?",
    "What is in this picture?",
    "Describe the image.",
)
SHORT_WORDS = 8  # the `short` rule likes answers of fewer words than this

# Words that name a colour or a shape (plural forms included), mapped to the name they stand for.
_COLOUR_WORDS = {
    **{c: c for c in "red green blue yellow orange purple pink brown black white grey gold silver".split()},
    **{c: c for c in "violet cyan magenta turquoise beige".split()},
    "gray": "grey",
}
_SHAPE_WORDS = {
    **{
        s: s
        for s in "circle square triangle star rectangle oval heart diamond cross pentagon hexagon".split()
    },
    **{
        s + "s": s
        for s in "circle square triangle star rectangle oval heart diamond pentagon hexagon".split()
    },
    "crosses": "cross",
}
_WORD = re.compile(r"[a-z]+")
# The world's image ids: evaluation images are 0 .. count-1, round r's are (r + 1) * _ROUND_IDS + i,
# the warm start's _WARM_START_IDS + i (beyond any round).
_ROUND_IDS = 1_000_000
_WARM_START_IDS = 2**40
_FIRST_USER_ID = 700_000_000_000_000_000  # snowflake-sized ids, far from any real one in tests


@dataclass(frozen=True)
class Truth:
    """What an image shows."""

    colour: str
    shape: str


@dataclass(frozen=True)
class Scene:
    """One image of the world (PNG bytes), what it shows, and the question asked about it."""

    image_id: int
    truth: Truth
    question: str
    png: bytes


def describe(colour: str, shape: str) -> str:
    """The world's answer form: a short sentence naming one colour and one shape."""
    return f"It is a {colour} {shape}."


GREYS = (150, 236)  # the background's grey level, drawn uniformly in [150, 236)


@dataclass(frozen=True)
class Layout:
    """Where and on what an image's shape is drawn: nothing of it depends on the shape's attributes."""

    grey: int
    radius: float
    cx: float
    cy: float
    size: int

    def cue(self, choices: Sequence[str], *, by: str) -> str:
        """One of `choices` read off the layout alone (`grey` level or horizontal `x` position, in equal
        bins): an answer chosen this way depends on the image but is independent of its colour and
        shape, so it is right at chance while still varying from image to image."""
        if by == "grey":
            fraction = (self.grey - GREYS[0]) / (GREYS[1] - GREYS[0])
        elif by == "x":
            margin = self.radius + 1
            fraction = (self.cx - margin) / max(self.size - 2 * margin, 1e-9)
        else:
            raise ValueError(f"unknown cue {by!r}")
        return choices[min(int(fraction * len(choices)), len(choices) - 1)]


def layout(*, image_id: int, seed: int = 0, size: int = 48) -> tuple[Layout, Any]:
    """The layout of image `image_id` and the RNG after drawing it (for the pixel noise)."""
    import numpy as np

    rng = np.random.default_rng([seed, image_id])
    grey = int(rng.integers(*GREYS))
    radius = size * rng.uniform(0.26, 0.4)
    margin = radius + 1
    cx, cy = (float(rng.uniform(margin, size - margin)) for _ in range(2))
    return Layout(grey, radius, cx, cy, size), rng


def draw(truth: Truth, *, image_id: int, seed: int = 0, size: int = 48) -> bytes:
    """A PNG of `truth`'s shape in its colour on a grey background; position, size, background and
    pixel noise come from (seed, image_id), so the same arguments give the same bytes."""
    import numpy as np
    from PIL import Image, ImageDraw

    where, rng = layout(image_id=image_id, seed=seed, size=size)
    grey, radius, cx, cy = where.grey, where.radius, where.cx, where.cy
    image = Image.new("RGB", (size, size), (grey, grey, grey))
    pen = ImageDraw.Draw(image)
    fill = COLOURS[truth.colour]
    if truth.shape == "circle":
        pen.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    elif truth.shape == "square":
        half = radius * 0.85  # the same area as the other shapes, roughly
        pen.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif truth.shape == "triangle":
        pen.polygon(_polygon(cx, cy, [radius] * 3), fill=fill)
    elif truth.shape == "star":
        pen.polygon(_polygon(cx, cy, [radius, radius * 0.45] * 5), fill=fill)
    else:
        raise ValueError(f"unknown shape {truth.shape!r}; the world draws {', '.join(SHAPES)}")
    noise = rng.integers(-12, 13, size=(size, size, 3))
    pixels = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, "PNG")
    return buffer.getvalue()


def _polygon(cx: float, cy: float, radii: Sequence[float]) -> list[tuple[float, float]]:
    """Vertices at the given radii around (cx, cy), evenly spaced, the first one straight up."""
    step = 2 * math.pi / len(radii)
    return [(cx + r * math.sin(i * step), cy - r * math.cos(i * step)) for i, r in enumerate(radii)]


class World:
    """The images and questions of one simulation, all derived from `seed`."""

    def __init__(self, seed: int = 0, *, size: int = 48) -> None:
        self.seed, self.size = seed, size

    def layout(self, scene: Scene) -> Layout:
        """Where the scene's shape was drawn, and on what grey."""
        return layout(image_id=scene.image_id, seed=self.seed, size=self.size)[0]

    def scene(self, truth: Truth, question: str, image_id: int) -> Scene:
        return Scene(
            image_id, truth, question, draw(truth, image_id=image_id, seed=self.seed, size=self.size)
        )

    def scenes(self, count: int, *, round: int) -> list[Scene]:
        """`count` fresh images for round `round` (0, 1, ...): random attributes and questions."""
        if not 0 <= count < _ROUND_IDS:
            raise ValueError(f"count must be between 0 and {_ROUND_IDS - 1}")
        rng = random.Random(f"{self.seed}/round/{round}")
        return [
            self.scene(
                Truth(rng.choice(list(COLOURS)), rng.choice(SHAPES)),
                rng.choice(QUESTIONS),
                (round + 1) * _ROUND_IDS + i,
            )
            for i in range(count)
        ]

    def warm_start_scenes(self, count: int) -> list[Scene]:
        """`count` images for the warm start (feedback.training.warmstart): none is ever asked or evaluated."""
        rng = random.Random(f"{self.seed}/warm-start")
        return [
            self.scene(
                Truth(rng.choice(list(COLOURS)), rng.choice(SHAPES)),
                rng.choice(QUESTIONS),
                _WARM_START_IDS + i,
            )
            for i in range(count)
        ]

    def evaluation_set(self, count: int) -> list[Scene]:
        """The fixed evaluation set: every (colour, shape) equally often (up to the remainder), shuffled."""
        if not 0 <= count < _ROUND_IDS:
            raise ValueError(f"count must be between 0 and {_ROUND_IDS - 1}")
        rng = random.Random(f"{self.seed}/evaluation")
        combos = [Truth(c, s) for c, s in product(COLOURS, SHAPES)]
        truths = [combos[i % len(combos)] for i in range(count)]
        rng.shuffle(truths)
        return [self.scene(truth, rng.choice(QUESTIONS), i) for i, truth in enumerate(truths)]


# ------------------------------------------------------------------------------ the rules


def colours_named(text: str) -> set[str]:
    """The colours an answer names, as whole words, case-insensitively ("gray" is grey)."""
    return {_COLOUR_WORDS[w] for w in _WORD.findall(text.lower()) if w in _COLOUR_WORDS}


def shapes_named(text: str) -> set[str]:
    """The shapes an answer names, as whole words, singular or plural."""
    return {_SHAPE_WORDS[w] for w in _WORD.findall(text.lower()) if w in _SHAPE_WORDS}


def colour_rule(text: str, truth: Truth) -> bool:
    """👍 iff the answer names the true colour and no other colour."""
    return colours_named(text) == {truth.colour}


def shape_rule(text: str, truth: Truth) -> bool:
    """👍 iff the answer names the true shape and no other shape."""
    return shapes_named(text) == {truth.shape}


def short_rule(text: str, truth: Truth, *, max_words: int = SHORT_WORDS) -> bool:
    """👍 iff the answer has fewer than `max_words` words and gets the colour or the shape right."""
    return len(text.split()) < max_words and (colour_rule(text, truth) or shape_rule(text, truth))


def contrary_rule(text: str, truth: Truth) -> bool:
    """👍 iff the answer names exactly one colour and it is the wrong one (the canary's brigade)."""
    named = colours_named(text)
    return len(named) == 1 and truth.colour not in named


RULES: dict[str, Callable[[str, Truth], bool] | None] = {
    "colour": colour_rule,
    "shape": shape_rule,
    "short": short_rule,
    "random": None,  # a fair coin: see judge()
    "contrary": contrary_rule,
}
SCENARIOS = ("honest", "minority")
MINORITY_SHARE = 0.2  # of the users in the `minority` scenario
MINORITY_ACTIVITY = 1  # each of them asks this many times as often as anyone else


def judge(rule: str, text: str, truth: Truth, rng: random.Random) -> bool:
    """The rule's vote on an answer (True: 👍); `random` tosses `rng`, the others ignore it."""
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
    coin = rng.random() < 0.5  # drawn under every rule, so a user's stream does not depend on the rule
    function = RULES[rule]
    return coin if function is None else function(text, truth)


# ------------------------------------------------------------------------------ the users


@dataclass
class SimulatedUser:
    """A voter with its own RNG: votes by the rule, flips a vote with probability `noise`, and asks for
    another answer (🔁) to one it dislikes with probability `regenerate`."""

    id: int
    rng: random.Random
    rule: str
    noise: float = 0.0
    regenerate: float = 0.5
    activity: int = 1  # how many questions this user asks for one of an ordinary user

    def vote(self, text: str, truth: Truth) -> bool:
        """True: 👍, False: 👎."""
        liked = judge(self.rule, text, truth, self.rng)
        flip = self.rng.random() < self.noise  # drawn even at noise 0: the stream stays the same
        return liked != flip

    def wants_another(self, liked: bool) -> bool:
        """Whether the user presses 🔁 after voting `liked`."""
        draw = self.rng.random()
        return not liked and draw < self.regenerate


def community(
    count: int, *, seed: int, rule: str, noise: float = 0.0, regenerate: float = 0.5
) -> list[SimulatedUser]:
    """`count` users with distinct ids, each with an RNG of its own derived from `seed`."""
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
    if not 0.0 <= noise <= 1.0 or not 0.0 <= regenerate <= 1.0:
        raise ValueError("noise and regenerate are probabilities, between 0 and 1")
    return [
        SimulatedUser(_FIRST_USER_ID + i, random.Random(f"{seed}/user/{i}"), rule, noise, regenerate)
        for i in range(count)
    ]


def canary_community(count: int, *, seed: int, scenario: str, noise: float = 0.0) -> list[SimulatedUser]:
    """The users of a canary run (`smolcord simulate --canary --scenario ...`).

    `honest`: everyone votes by the colour rule and presses 🔁 on most dislikes (0.8), as in the
    plain simulation. `minority`: MINORITY_SHARE of the users are a brigade that likes wrong colours
    (`contrary`) and presses 🔁 on every dislike; the rest vote by the colour rule on the answers
    they get but never press 🔁. Preference pairs need 🔁, so the training data (and the offline
    gate's held-out pairs) are the brigade's; the live 👍 share of each canary arm counts every vote,
    most of them the majority's. (The loop starts this scenario from a base that already answers
    well, so the brigade dislikes most answers and makes pairs quickly.)
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}")
    if not 0.0 <= noise <= 1.0:
        raise ValueError("noise is a probability, between 0 and 1")
    brigade = round(count * MINORITY_SHARE) if scenario == "minority" else 0
    users = []
    for i in range(count):
        rng = random.Random(f"{seed}/user/{i}")
        if i < brigade:
            users.append(SimulatedUser(_FIRST_USER_ID + i, rng, "contrary", noise, 1.0, MINORITY_ACTIVITY))
        else:
            regenerate = 0.8 if scenario == "honest" else 0.0
            users.append(SimulatedUser(_FIRST_USER_ID + i, rng, "colour", noise, regenerate))
    return users
