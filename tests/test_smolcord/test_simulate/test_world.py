"""The simulated world: deterministic images, a fixed evaluation set, and rules that read words exactly."""

from __future__ import annotations

import hashlib
import io
import random
from collections import Counter

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from smolcord.simulate.world import (
    COLOURS,
    SHAPES,
    SHORT_WORDS,
    Truth,
    World,
    colour_rule,
    colours_named,
    community,
    describe,
    draw,
    judge,
    shape_rule,
    shapes_named,
    short_rule,
)

RED_CIRCLE = Truth("red", "circle")


# ------------------------------------------------------------------------------ images


def test_images_are_seeded_pngs_of_the_true_colour() -> None:
    for colour, shape in [("red", "circle"), ("blue", "star"), ("yellow", "triangle"), ("green", "square")]:
        png = draw(Truth(colour, shape), image_id=3, seed=1)
        assert png == draw(Truth(colour, shape), image_id=3, seed=1)
        assert png != draw(Truth(colour, shape), image_id=4, seed=1)
        assert png != draw(Truth(colour, shape), image_id=3, seed=2)
        image = Image.open(io.BytesIO(png))
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (48, 48)
        # The saturated pixels are the shape's, close to its colour on average.
        mask = shape_mask(png)
        assert mask.sum() > 48 * 48 * 0.08
        mean = np.asarray(image).reshape(-1, 3)[mask.reshape(-1)].mean(0)
        nearest = min(COLOURS, key=lambda c: float(((np.array(COLOURS[c]) - mean) ** 2).sum()))
        assert nearest == colour


def shape_mask(png: bytes) -> np.ndarray:
    pixels = np.asarray(Image.open(io.BytesIO(png))).astype(int)
    return (pixels.max(-1) - pixels.min(-1)) > 80  # saturated: the shape, not the grey background


def test_the_four_shapes_are_drawn_differently() -> None:
    for image_id in range(4):
        masks = {s: shape_mask(draw(Truth("blue", s), image_id=image_id)) for s in SHAPES}
        areas = {s: int(m.sum()) for s, m in masks.items()}
        # Same place and size for one image id: circle (πr²) and square (2.9r²) fill about twice a
        # triangle (1.3r²) or a five-pointed star (1.3r²), which differ in outline.
        assert min(areas["circle"], areas["square"]) > 1.8 * max(areas["triangle"], areas["star"])
        assert len({m.tobytes() for m in masks.values()}) == 4
    with pytest.raises(ValueError, match="unknown shape"):
        draw(Truth("blue", "hexagon"), image_id=0)


def test_the_evaluation_set_is_fixed_balanced_and_disjoint_from_every_round() -> None:
    world = World(seed=5)
    evaluation = world.evaluation_set(32)
    assert evaluation == World(seed=5).evaluation_set(32)
    assert evaluation != World(seed=6).evaluation_set(32)
    assert Counter(s.truth for s in evaluation) == Counter({Truth(c, s): 2 for c in COLOURS for s in SHAPES})
    assert len({s.question for s in evaluation}) > 3
    hashes = {hashlib.sha256(s.png).digest() for s in evaluation}
    assert len(hashes) == 32
    for round_ in range(3):
        scenes = world.scenes(24, round=round_)
        assert scenes == world.scenes(24, round=round_)
        assert not hashes & {hashlib.sha256(s.png).digest() for s in scenes}
        assert not {s.image_id for s in evaluation} & {s.image_id for s in scenes}
    assert world.scenes(24, round=0) != world.scenes(24, round=1)
    warm = world.warm_start_scenes(24)
    assert warm == world.warm_start_scenes(24)
    assert not hashes & {hashlib.sha256(s.png).digest() for s in warm}


# ------------------------------------------------------------------------------ rules


@pytest.mark.parametrize(
    ("text", "liked"),
    [
        ("It is a red circle.", True),
        ("RED!", True),
        ("red", True),
        ("Red, definitely red.", True),
        ("It's red-ish.", True),  # "red" is a word of its own here
        ("Reddish.", False),  # ... but not here
        ("red or blue", False),
        ("It is blue.", False),
        ("A circle.", False),
        ("", False),
        ("It is a red circle on a white background.", False),  # names white too
        ("predator", False),
        ("It is a gray circle.", False),
    ],
)
def test_the_colour_rule(text: str, liked: bool) -> None:
    assert colour_rule(text, RED_CIRCLE) is liked


@pytest.mark.parametrize(
    ("text", "liked"),
    [
        ("It is a red circle.", True),
        ("CIRCLES everywhere!!", True),
        ("A circle, or rather a circle.", True),
        ("a circle or a square", False),
        ("Circular.", False),
        ("It is a red star.", False),
        ("semicircle", False),
    ],
)
def test_the_shape_rule(text: str, liked: bool) -> None:
    assert shape_rule(text, RED_CIRCLE) is liked


@pytest.mark.parametrize(
    ("text", "liked"),
    [
        ("A red star.", True),  # the colour is right
        ("A blue circle.", True),  # the shape is right
        ("A blue star.", False),
        ("It is a red circle, I think, likely.", False),  # 8 words: not short
        ("It is a red circle, I think.", True),  # 7
    ],
)
def test_the_short_rule(text: str, liked: bool) -> None:
    assert SHORT_WORDS == 8
    assert short_rule(text, RED_CIRCLE) is liked


def test_names_are_read_as_whole_words_case_insensitively() -> None:
    assert colours_named("Gray, GREY and red; BLUE?") == {"grey", "red", "blue"}
    assert colours_named("Reddish bluish greenery") == set()
    assert shapes_named("Two Triangles and a star-shaped thing") == {"triangle", "star"}


@given(st.sampled_from(list(COLOURS)), st.sampled_from(SHAPES), st.sampled_from(list(COLOURS)))
def test_the_worlds_own_answers_are_judged_by_what_they_name(colour: str, shape: str, said: str) -> None:
    truth = Truth(colour, shape)
    text = describe(said, shape)
    assert colour_rule(text, truth) is (said == colour)
    assert shape_rule(text, truth)
    assert short_rule(text, truth)


def test_random_is_a_seeded_fair_coin_and_unknown_rules_are_refused() -> None:
    votes = [judge("random", "It is a red circle.", RED_CIRCLE, random.Random(i)) for i in range(400)]
    assert 160 < sum(votes) < 240
    assert votes == [judge("random", "x", RED_CIRCLE, random.Random(i)) for i in range(400)]
    with pytest.raises(ValueError, match="unknown rule"):
        judge("politeness", "x", RED_CIRCLE, random.Random(0))


# ------------------------------------------------------------------------------ users


def test_users_are_distinct_seeded_and_vote_by_the_rule() -> None:
    users = community(12, seed=3, rule="colour")
    assert len({u.id for u in users}) == 12
    again = community(12, seed=3, rule="colour")
    for user, twin in zip(users, again, strict=True):
        for person in (user, twin):
            assert person.vote("It is a red star.", RED_CIRCLE) is True
            assert person.vote("It is a blue star.", RED_CIRCLE) is False
        assert user.rng.random() == twin.rng.random()
    assert users[0].rng.random() != users[1].rng.random()
    with pytest.raises(ValueError):
        community(2, seed=0, rule="colour", noise=1.5)


def test_noise_flips_that_share_of_votes() -> None:
    [user] = community(1, seed=0, rule="colour", noise=0.2)
    votes = [user.vote("It is a red circle.", RED_CIRCLE) for _ in range(2000)]
    assert 0.17 < votes.count(False) / len(votes) < 0.23


def test_users_ask_for_another_answer_only_to_ones_they_dislike() -> None:
    [user] = community(1, seed=0, rule="colour", regenerate=0.5)
    assert not any(user.wants_another(True) for _ in range(200))
    share = sum(user.wants_another(False) for _ in range(2000)) / 2000
    assert 0.45 < share < 0.55
    [never] = community(1, seed=0, rule="colour", regenerate=0.0)
    assert not any(never.wants_another(False) for _ in range(200))


def test_the_contrary_rule_likes_one_wrong_colour_only() -> None:
    from smolcord.simulate.world import contrary_rule

    truth = Truth("red", "circle")
    assert contrary_rule("It is a blue circle.", truth)
    assert not contrary_rule("It is a red circle.", truth)
    assert not contrary_rule("It is a blue and green circle.", truth)
    assert not contrary_rule("It is a circle.", truth)


def test_canary_communities_split_as_their_scenario_says() -> None:
    from smolcord.simulate.world import MINORITY_ACTIVITY, canary_community

    honest = canary_community(60, seed=0, scenario="honest")
    assert {u.rule for u in honest} == {"colour"} and {u.regenerate for u in honest} == {0.8}
    minority = canary_community(60, seed=0, scenario="minority")
    brigade = [u for u in minority if u.rule == "contrary"]
    assert len(brigade) == 12 and all(
        u.regenerate == 1.0 and u.activity == MINORITY_ACTIVITY for u in brigade
    )
    rest = [u for u in minority if u.rule == "colour"]
    assert len(rest) == 48 and all(u.regenerate == 0.0 and u.activity == 1 for u in rest)
    assert len({u.id for u in minority}) == 60
    with pytest.raises(ValueError, match="scenario"):
        canary_community(60, seed=0, scenario="loud")
