"""Canary rollout in the store: the arms counted as pairs count votes, the Beta-posterior decision, the history."""

from __future__ import annotations

import asyncio
import json
import math
import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import update
from test_feedback.harness import GUILD, ROLE

from feedback.store import canary as canary_service
from feedback.store import consent as consent_service
from feedback.store.canary import ArmStats, decide, p_not_worse
from feedback.store.errors import CanaryDecided, UnknownCanary
from feedback.store.models import Response

START = datetime(2026, 12, 1, 3, 0, tzinfo=UTC)
RULES = {"margin": 0.05, "min_rated": 30, "confidence": 0.95, "started_at": START, "max_days": 7.0}


def arm(version: str | None, liked: int, disliked: int) -> ArmStats:
    return ArmStats(version=version, rated=liked + disliked, liked=liked)


def day(n: float) -> datetime:
    return START + timedelta(days=n)


# ------------------------------------------------------------------------ the probabilities


def exact_p_better(current: ArmStats, candidate: ArmStats) -> float:
    """P(rate_candidate > rate_current) in closed form (a finite sum for integer Beta parameters)."""
    ak, bk = 1 + current.liked, 1 + current.disliked
    ac, bc = 1 + candidate.liked, 1 + candidate.disliked

    def log_beta(a: float, b: float) -> float:
        return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)

    return sum(
        math.exp(log_beta(ak + i, bk + bc) - math.log(bc + i) - log_beta(1 + i, bc) - log_beta(ak, bk))
        for i in range(ac)
    )


@pytest.mark.parametrize(
    ("current", "candidate"),
    [
        ((0, 0), (0, 0)),
        ((30, 10), (20, 20)),
        ((5, 0), (0, 5)),
        ((300, 100), (290, 110)),
        ((3000, 1000), (30, 10)),  # very different widths, both ways round
        ((30, 10), (3000, 1000)),
        ((1, 50), (40, 2)),
    ],
)
def test_probability_matches_the_closed_form_at_margin_zero(current, candidate):
    cur, cand = arm("v1", *current), arm("v2", *candidate)
    assert p_not_worse(cur, cand, 0.0) == pytest.approx(exact_p_better(cur, cand), abs=1e-9)


@pytest.mark.parametrize(
    ("current", "candidate", "margin"), [((30, 10), (20, 20), 0.05), ((300, 100), (280, 120), 0.1)]
)
def test_probability_with_a_margin_matches_sampling(current, candidate, margin):
    cur, cand = arm("v1", *current), arm("v2", *candidate)
    rng = random.Random(7)
    n = 100_000
    sampled = (
        sum(
            rng.betavariate(1 + cand.liked, 1 + cand.disliked)
            - rng.betavariate(1 + cur.liked, 1 + cur.disliked)
            > -margin
            for _ in range(n)
        )
        / n
    )
    assert p_not_worse(cur, cand, margin) == pytest.approx(sampled, abs=0.006)  # 4 standard errors
    assert p_not_worse(cur, cand, margin) > p_not_worse(cur, cand, 0.0)


# ------------------------------------------------------------------------------ the decision


def test_waits_until_both_arms_have_min_rated():
    # overwhelming votes, but current has 29 rated answers: the rule waits for the 30th
    decision = decide(arm("v1", 0, 29), arm("v2", 100, 0), now=day(1), **RULES)
    assert (decision.decision, decision.rule) == ("waiting", "min_rated")
    assert "v1 29/30" in decision.reason and "v2" not in decision.reason.split("(")[1].split(")")[0]
    decision = decide(arm("v1", 0, 30), arm("v2", 100, 0), now=day(1), **RULES)
    assert (decision.decision, decision.rule) == ("promote", "live")


def test_the_confidence_threshold_is_inclusive():
    current, candidate = arm("v1", 25, 15), arm("v2", 27, 13)
    probability = p_not_worse(current, candidate, 0.05)
    assert 0.6 < probability < 0.99
    at = decide(current, candidate, now=day(1), **(RULES | {"confidence": probability}))
    assert (at.decision, at.rule) == ("promote", "live")
    assert at.numbers["p_not_worse"] == pytest.approx(probability, abs=1e-6)
    above = decide(current, candidate, now=day(1), **(RULES | {"confidence": probability + 1e-9}))
    assert (above.decision, above.rule) == ("waiting", "confidence")


def test_a_clearly_worse_candidate_is_rejected_live():
    # the minority scenario: the offline gate liked it, the people it serves do not
    decision = decide(arm("v1", 60, 40), arm("v2", 30, 70), now=day(2), **RULES)
    assert (decision.decision, decision.rule) == ("reject", "live")
    assert decision.numbers["p_worse"] > 0.999
    assert "worse at 95%" in decision.reason


def test_a_candidate_surely_worse_within_the_margin_is_promoted():
    # 88% against 90% on 10,000 answers each: worse for sure, but by less than the accepted margin
    decision = decide(arm("v1", 9000, 1000), arm("v2", 8800, 1200), now=day(2), **RULES)
    assert decision.numbers["p_worse"] > 0.99 and decision.numbers["p_not_worse"] > 0.99
    assert (decision.decision, decision.rule) == ("promote", "live")


def test_inconclusive_votes_wait_for_confidence_then_time_out():
    current, candidate = arm("v1", 24, 16), arm("v2", 22, 18)  # 60% vs 55%: nothing is sure
    before = decide(current, candidate, now=day(7) - timedelta(seconds=1), **RULES)
    assert (before.decision, before.rule) == ("waiting", "confidence")
    assert "or the timeout in 0.0 hours" in before.reason
    at = decide(current, candidate, now=day(7), **RULES)
    # the votes lean against it, but not at 0.8: the offline gate's verdict stands
    assert at.numbers["p_worse"] < 0.8
    assert (at.decision, at.rule) == ("promote", "timeout")
    assert at.numbers["deadline"] == day(7).isoformat()


def test_timeout_rejects_when_the_votes_lean_against_the_candidate():
    # a small server: few votes, leaning against the candidate at 0.8 but not at 0.95
    current, candidate = arm("v1", 6, 2), arm("v2", 3, 5)
    probability = 1 - p_not_worse(current, candidate, 0.0)
    assert 0.8 <= probability < 0.95
    assert decide(current, candidate, now=day(6.9), **RULES).decision == "waiting"
    decision = decide(current, candidate, now=day(7.5), **RULES)
    assert (decision.decision, decision.rule) == ("reject", "timeout")
    assert "lean against it at 80%" in decision.reason
    # the lean threshold is never stricter than the live confidence
    loose = decide(current, candidate, now=day(7.5), **(RULES | {"confidence": 0.7}))
    assert loose.numbers["lean_confidence"] == 0.7


@pytest.mark.parametrize(
    ("current", "candidate"),
    [
        ((0, 0), (0, 0)),  # no votes at all
        ((200, 2), (0, 0)),  # no votes on the candidate: the prior is not evidence
        ((200, 2), (3, 0)),  # only 👍 for the candidate, fewer than current's near-perfect record
    ],
)
def test_timeout_promotes_without_votes_against_the_candidate(current, candidate):
    decision = decide(arm("v1", *current), arm("v2", *candidate), now=day(8), **RULES)
    assert (decision.decision, decision.rule) == ("promote", "timeout")
    assert "offline gate's verdict stands" in decision.reason


def test_the_live_rule_wins_over_the_timeout():
    decision = decide(arm("v1", 60, 40), arm("v2", 30, 70), now=day(30), **RULES)
    assert (decision.decision, decision.rule) == ("reject", "live")


def test_numbers_are_json_and_name_both_arms():
    decision = decide(arm(None, 20, 10), arm("v2", 12, 8), now=day(1), **RULES)
    numbers = json.loads(json.dumps(decision.numbers))
    assert numbers["current"] == {
        "version": None,
        "rated": 30,
        "liked": 20,
        "share": pytest.approx(2 / 3, abs=1e-6),
        "interval": numbers["current"]["interval"],
    }
    for side in ("current", "candidate"):
        low, high = numbers[side]["interval"]
        assert 0 < low < numbers[side]["share"] < high < 1
    assert numbers["candidate"]["share"] == 0.6 and numbers["days"] == 1.0
    assert {"p_not_worse", "p_worse", "margin", "confidence", "min_rated", "deadline"} <= set(numbers)
    empty = decide(arm("v1", 0, 0), arm("v2", 0, 0), now=day(1), **RULES).numbers
    assert empty["candidate"]["share"] is None
    assert empty["candidate"]["interval"] == [pytest.approx(0.025, abs=1e-9), pytest.approx(0.975, abs=1e-9)]


COUNTS = st.integers(min_value=0, max_value=120)
RANK = {"reject": 0, "waiting": 1, "promote": 2}


@settings(max_examples=150)
@given(
    current_liked=COUNTS,
    current_disliked=COUNTS,
    liked=COUNTS,
    disliked=COUNTS,
    days=st.sampled_from([0.5, 6.99, 7.0, 20.0]),
    min_rated=st.sampled_from([1, 10, 30]),
)
def test_more_likes_for_the_candidate_never_turn_promote_into_reject(
    current_liked, current_disliked, liked, disliked, days, min_rated
):
    rules = RULES | {"min_rated": min_rated}
    current = arm("v1", current_liked, current_disliked)
    base = decide(current, arm("v2", liked, disliked), now=day(days), **rules)
    one_more_like = decide(current, arm("v2", liked + 1, disliked), now=day(days), **rules)
    assert not (base.decision == "promote" and one_more_like.decision == "reject")
    if disliked:
        # a 👎 turned into a 👍: the same rated answers, better votes, never a worse decision
        flipped = decide(current, arm("v2", liked + 1, disliked - 1), now=day(days), **rules)
        assert RANK[flipped.decision] >= RANK[base.decision]
    assert one_more_like.numbers["p_not_worse"] >= base.numbers["p_not_worse"] - 1e-9
    assert one_more_like.numbers["p_worse"] <= base.numbers["p_worse"] + 1e-9


@settings(max_examples=60)
@given(liked=COUNTS, disliked=COUNTS, days=st.floats(min_value=0, max_value=30))
def test_identical_arms_are_never_rejected(liked, disliked, days):
    same = decide(arm("v1", liked, disliked), arm("v2", liked, disliked), now=day(days), **RULES)
    assert same.decision != "reject"
    assert same.numbers["p_worse"] == pytest.approx(0.5, abs=1e-6)


# --------------------------------------------------------------------- arm_stats on a store


async def set_created_at(store, response_id: int, when: datetime) -> None:
    async with store.sessions() as session, session.begin():
        await session.execute(update(Response).where(Response.id == response_id).values(created_at=when))


async def answered(store, version: str | None, votes: dict[int, str | tuple[str, ...]], **prompt) -> int:
    """One prompt answered by `version`, with each user's reactions on the answer; returns the response id."""
    recorded = await store.prompt(**prompt)
    response_id, [message] = await store.answer(
        recorded.id, f"answer {store.new_id()}", adapter_version=version
    )
    for user, emojis in votes.items():
        for emoji in (emojis,) if isinstance(emojis, str) else emojis:
            await store.vote(message, user, emoji)
    return response_id


async def stats_of(store, version: str | None, since: datetime) -> tuple[int, int]:
    got = await store.call(canary_service.arm_stats, settings=store.settings, version=version, since=since)
    assert got.version == version
    return got.rated, got.liked


async def test_arm_stats_count_net_votes_per_answer_in_eligible_prompts(store):
    await store.learning()
    since = datetime.now(UTC) - timedelta(minutes=1)
    # v2 (the candidate): liked by net vote, one user one vote, skin tones the same 👍
    await answered(store, "v2", {1: "👍", 2: "👍", 3: "👎"})  # +1: liked
    await answered(store, "v2", {1: "👍", 2: "👎"})  # 0: not rated
    await answered(store, "v2", {1: ("👍", "👎")})  # one user, both: 0, not rated
    await answered(store, "v2", {1: ("👍", "👍🏽"), 2: "👎"})  # one user's two 👍 count once: 0
    await answered(store, "v2", {4: "👎"})  # −1: rated, not liked
    await answered(store, "v2", {5: "👍🏿"})  # +1: liked
    await answered(store, "v2", {})  # no votes: not rated
    # v1 (current) and the base model are other arms
    await answered(store, "v1", {1: "👍"})
    await answered(store, "v1", {1: "👎"})
    await answered(store, None, {1: "👍"})
    assert await stats_of(store, "v2", since) == (3, 2)
    assert await stats_of(store, "v1", since) == (2, 1)
    assert await stats_of(store, None, since) == (1, 1)
    assert await stats_of(store, "v3", since) == (0, 0)


async def test_arm_stats_count_first_answers_not_the_alternatives_asked_after_a_dislike(store):
    """A 🔁 alternative exists because an answer was disliked: counting alternatives would weigh an
    arm by its dislikes and by whoever presses 🔁 most."""
    await store.learning()
    since = datetime.now(UTC) - timedelta(minutes=1)
    recorded = await store.prompt()
    _, [first] = await store.answer(recorded.id, "first", adapter_version="v2")
    await store.vote(first, 1, "👎")
    for n in range(3):  # a 🔁-happy voter's chain of alternatives, all disliked but the last
        _, [other] = await store.answer(recorded.id, f"alt {n}", adapter_version="v2", regenerated=True)
        await store.vote(other, 1, "👍" if n == 2 else "👎")
    assert await stats_of(store, "v2", since) == (1, 0)


async def test_arm_stats_leave_out_what_training_leaves_out(store):
    other_guild, role_guild = GUILD + 1, GUILD + 2
    await store.learning()
    await store.learning(other_guild, enabled=False)
    await store.learning(role_guild)
    await store.call(
        consent_service.set_voter_role, settings=store.settings, guild_id=role_guild, role_id=ROLE
    )
    since = datetime.now(UTC) - timedelta(minutes=1)
    await answered(store, "v2", {1: "👍"})  # counts
    await answered(store, "v2", {1: "👍"}, guild_id=None)  # a DM: never
    await answered(store, "v2", {1: "👍"}, guild_id=other_guild)  # learning off there
    await answered(store, "v2", {1: "👍"}, author_id=77)  # its author opts out below
    await answered(store, "v2", {66: "👎", 1: "👍"})  # voter 66 opts out below: net +1 then
    # a guild with a voter role: votes of non-holders do not count
    recorded = await store.prompt(guild_id=role_guild)
    _, [message] = await store.answer(recorded.id, "role answer", adapter_version="v2")
    await store.vote(message, 8, "👎", roles=[])  # not a holder
    await store.vote(message, 9, "👍", roles=[ROLE])
    await store.call(consent_service.opt_out, user_id=77)
    await store.call(consent_service.opt_out, user_id=66)
    assert await stats_of(store, "v2", since) == (3, 3)
    # learning turned off later: what was recorded meanwhile leaves the count at once, as for training
    await store.learning(enabled=False)
    assert await stats_of(store, "v2", since) == (1, 1)


async def test_arm_stats_count_answers_since_the_canary_began(store):
    await store.learning()
    old = await answered(store, "v2", {1: "👍"})
    new = await answered(store, "v2", {1: "👎"})
    began = datetime(2026, 12, 1, tzinfo=UTC)
    await set_created_at(store, old, began - timedelta(seconds=1))
    await set_created_at(store, new, began)
    assert await stats_of(store, "v2", began) == (1, 0)
    assert await stats_of(store, "v2", began - timedelta(days=1)) == (2, 1)


# ---------------------------------------------------------------------------- the history


async def test_canary_history_start_decide(store):
    assert await store.call(canary_service.active_canary) is None
    first = await store.call(canary_service.start_canary, candidate="v2", current=None, share=0.2, now=START)
    assert (first.candidate_version, first.current_version, first.share) == ("v2", None, 0.2)
    assert first.started_at == START and first.decision is None
    assert await store.call(canary_service.active_canary) == first
    decision = decide(arm(None, 10, 30), arm("v2", 30, 10), now=day(3), **RULES)
    decided = await store.call(
        canary_service.record_decision,
        canary_id=first.id,
        decision=decision.decision,
        rule=decision.rule,
        stats=decision.numbers,
        now=day(3),
    )
    assert (decided.decision, decided.rule, decided.decided_at) == ("promote", "live", day(3))
    assert decided.stats == json.loads(json.dumps(decision.numbers))
    assert await store.call(canary_service.active_canary) is None
    with pytest.raises(CanaryDecided):
        await store.call(
            canary_service.record_decision, canary_id=first.id, decision="abort", rule="admin", stats=None
        )
    with pytest.raises(UnknownCanary):
        await store.call(
            canary_service.record_decision, canary_id=999, decision="abort", rule="admin", stats=None
        )
    with pytest.raises(ValueError):
        await store.call(
            canary_service.record_decision, canary_id=first.id, decision="waiting", rule="live", stats=None
        )

    second = await store.call(
        canary_service.start_canary, candidate="v3", current="v2", share=0.2, now=day(4)
    )
    third = await store.call(canary_service.start_canary, candidate="v4", current="v2", share=0.3, now=day(5))
    history = await store.call(canary_service.canary_history, limit=10)
    assert [c.candidate_version for c in history] == ["v4", "v3", "v2"]
    # a canary still open in the store when another starts was lost by the registry: closed as superseded
    assert (history[1].decision, history[1].rule, history[1].decided_at) == ("abort", "superseded", day(5))
    assert await store.call(canary_service.active_canary) == third
    assert second.id != third.id
    assert [c.id for c in await store.call(canary_service.canary_history, limit=1)] == [third.id]
    admin = await store.call(
        canary_service.record_decision,
        canary_id=third.id,
        decision="abort",
        rule="admin",
        stats=None,
        decided_by=42,
    )
    assert admin.decided_by == 42


async def test_concurrent_decisions_record_one(store):
    started = await store.call(canary_service.start_canary, candidate="v2", current="v1", share=0.2)
    outcomes = await asyncio.gather(
        store.call(
            canary_service.record_decision, canary_id=started.id, decision="promote", rule="live", stats={}
        ),
        store.call(
            canary_service.record_decision, canary_id=started.id, decision="abort", rule="admin", stats=None
        ),
        return_exceptions=True,
    )
    assert sorted(type(o).__name__ for o in outcomes) == ["Canary", "CanaryDecided"]
    [winner] = [o for o in outcomes if not isinstance(o, Exception)]
    [stored] = await store.call(canary_service.canary_history)
    assert (stored.decision, stored.rule) == (winner.decision, winner.rule)
