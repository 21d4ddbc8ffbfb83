"""Canary rollout: the live 👍 shares of the two arms, the decision they make, and the canaries' history.

A candidate that passed the offline gate serves a sticky share of users (smolcord.canary) beside
the current version; the registry on disk says which canary runs, this module keeps its history
and decides it. Each arm's numbers count *rated answers*: first answers (not 🔁 alternatives, which
exist only because an answer was disliked) served by that version since the canary began, in
prompts eligible for training, whose net vote is not zero (one vote per
user, (👍 present) − (👎 present), summed: exactly as pair building counts them, consent and voter
rules included, so the canary is judged by the votes training would use). An answer is *liked*
when its net vote is positive; an arm's 👍 share is liked / rated.

The decision (`decide`, pure and deterministic) is Bayesian. Each arm's 👍 rate gets a
Beta(1 + liked, 1 + disliked) posterior (a uniform prior), and two probabilities are integrated
numerically (in plain Python: the store imports no numpy or scipy):

- p_not_worse = P(rate_candidate − rate_current > −margin): the candidate is not worse by more
  than SMOLCORD_CANARY_MARGIN;
- p_worse = P(rate_candidate < rate_current): the candidate is worse at all.

Rules, in this order:

1. live: once both arms have SMOLCORD_CANARY_MIN_RATED rated answers, promote when
   p_not_worse ≥ SMOLCORD_CANARY_CONFIDENCE (0.95), reject when p_worse ≥ it. (When the
   candidate is surely worse but surely within the margin, both hold: the margin is the loss the
   operator accepts, so it is promoted.)
2. timeout: after SMOLCORD_CANARY_MAX_DAYS without a live decision, the offline gate's verdict
   stands (promote) unless the votes lean against the candidate: p_worse ≥ LEAN_CONFIDENCE (0.8,
   or the live confidence if that is lower) *and* its observed 👍 share is below current's. The
   second condition keeps the uniform prior from speaking for votes that were never cast: a
   candidate with no rated answers, or only 👍, is never rejected on the prior alone. So a small
   server never stalls learning, and a candidate its few voters dislike still goes.
3. Otherwise waiting: rule "min_rated" (an arm lacks rated answers) or "confidence" (neither
   probability is high enough yet).

Why this test: it answers the operator's question directly (how likely is the candidate no worse
than current by more than the margin), it behaves at the small counts a Discord server produces
(no normal approximation, unlike a two-proportion z-test), and more 👍 for the candidate can only
move it towards promotion (its posterior grows stochastically, both probabilities move the right
way). Repeatedly looking at the data every night inflates the error rates somewhat, as for any
sequential use of a fixed-level test; MIN_RATED and a 0.95 threshold keep that modest.

Each arm's interval is the equal-tailed credible interval of its 👍 rate at the same confidence.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import case, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from feedback.store.db import transaction
from feedback.store.errors import CanaryDecided, UnknownCanary
from feedback.store.models import CanaryRollout, Response, utcnow
from feedback.store.stats import trainable_scores

if TYPE_CHECKING:
    from smolcord.settings import Settings

__all__ = [
    "DECISIONS",
    "LEAN_CONFIDENCE",
    "RULES",
    "ArmStats",
    "Canary",
    "CanaryDecision",
    "active_canary",
    "arm_stats",
    "canary_history",
    "decide",
    "p_not_worse",
    "record_decision",
    "start_canary",
]

log = logging.getLogger(__name__)

DECISIONS = ("promote", "reject", "abort")  # what a recorded decision may be
RULES = ("live", "timeout", "admin", "superseded")  # what made it
# At the timeout, votes that lean against the candidate with this posterior probability reject it.
LEAN_CONFIDENCE = 0.8


# ------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Canary:
    """One canary as recorded: which candidate against which current, and its decision once made."""

    id: int
    candidate_version: str
    current_version: str | None  # None: the base model
    share: float
    started_at: datetime
    decided_at: datetime | None
    decision: str | None  # "promote" | "reject" | "abort"; None while it runs
    rule: str | None  # "live" | "timeout" | "admin" | "superseded"
    stats: dict[str, Any] | None
    decided_by: int | None


def _canary(row: CanaryRollout) -> Canary:
    return Canary(
        id=row.id,
        candidate_version=row.candidate_version,
        current_version=row.current_version,
        share=row.share,
        started_at=row.started_at,
        decided_at=row.decided_at,
        decision=row.decision,
        rule=row.rule,
        stats=row.stats,
        decided_by=row.decided_by,
    )


async def start_canary(
    session: AsyncSession, *, candidate: str, current: str | None, share: float, now: datetime | None = None
) -> Canary:
    """Record a new canary; one still undecided in the store is closed as aborted ("superseded")."""
    now = now or utcnow()
    async with transaction(session):
        # The registry allows one canary at a time; an undecided row here lost its registry state
        # (aborted by hand, say), so it is closed rather than left running twice.
        superseded = await session.execute(
            update(CanaryRollout)
            .where(CanaryRollout.decided_at.is_(None))
            .values(decided_at=now, decision="abort", rule="superseded")
        )
        row = CanaryRollout(candidate_version=candidate, current_version=current, share=share, started_at=now)
        session.add(row)
        await session.flush()
        record = _canary(row)
    log.info(
        "canary %d started: %s against %s, share %.2f (%d superseded)",
        record.id,
        candidate,
        current or "base",
        share,
        superseded.rowcount,  # type: ignore[attr-defined]
    )
    return record


async def active_canary(session: AsyncSession) -> Canary | None:
    """The undecided canary, None when none runs."""
    async with transaction(session):
        row = await session.scalar(
            select(CanaryRollout)
            .where(CanaryRollout.decided_at.is_(None))
            .order_by(CanaryRollout.id.desc())
            .limit(1)
        )
        return None if row is None else _canary(row)


async def record_decision(
    session: AsyncSession,
    *,
    canary_id: int,
    decision: str,
    rule: str,
    stats: Mapping[str, Any] | None,
    decided_by: int | None = None,
    now: datetime | None = None,
) -> Canary:
    """Record how a canary ended, once: UnknownCanary, or CanaryDecided when another decision came first."""
    if decision not in DECISIONS:
        raise ValueError(f"decision must be one of {DECISIONS}, got {decision!r}")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    now = now or utcnow()
    async with transaction(session):
        # one conditional UPDATE: of two concurrent decisions, exactly one finds the row undecided
        result = await session.execute(
            update(CanaryRollout)
            .where(CanaryRollout.id == canary_id, CanaryRollout.decided_at.is_(None))
            .values(
                decided_at=now,
                decision=decision,
                rule=rule,
                stats=dict(stats) if stats is not None else None,
                decided_by=decided_by,
            )
        )
        row = await session.get(CanaryRollout, canary_id, populate_existing=True)
        if row is None:
            raise UnknownCanary(f"no canary {canary_id}")
        if result.rowcount == 0:  # type: ignore[attr-defined]
            raise CanaryDecided(f"canary {canary_id} was decided already ({row.decision}, rule {row.rule})")
        record = _canary(row)
    log.info("canary %d: %s (rule %s)", canary_id, decision, rule)
    return record


async def canary_history(session: AsyncSession, *, limit: int = 20) -> list[Canary]:
    """The latest canaries, newest first."""
    async with transaction(session):
        rows = await session.scalars(select(CanaryRollout).order_by(CanaryRollout.id.desc()).limit(limit))
        return [_canary(row) for row in rows]


# ---------------------------------------------------------------------------------- arms


@dataclass(frozen=True)
class ArmStats:
    """One arm's rated answers (net vote ≠ 0) and liked ones (net vote > 0)."""

    version: str | None  # None: the base model
    rated: int
    liked: int

    @property
    def disliked(self) -> int:
        return self.rated - self.liked

    @property
    def share(self) -> float | None:
        """👍 share: liked / rated, None before any rated answer."""
        return self.liked / self.rated if self.rated else None


async def arm_stats(
    session: AsyncSession, *, settings: Settings, version: str | None, since: datetime
) -> ArmStats:
    """Rated and liked first answers served by `version` since `since`, in eligible prompts, counted
    as pairs count votes.

    First answers only: a 🔁 alternative exists because someone disliked an answer, so counting the
    alternatives would weigh each arm by how often its answers are disliked and by who presses 🔁
    most (a 🔁-happy minority casts several votes a question). A first answer is one fresh draw of
    the version's answers to one question: the share the arm's people get.
    """
    # the pair builder's own scores (consent, DMs, opted-out voters, voter roles): no rule of our own
    scores = trainable_scores(settings)
    served = Response.adapter_version.is_(None) if version is None else Response.adapter_version == version
    statement = (
        select(func.count(), func.coalesce(func.sum(case((scores.c.score > 0, 1), else_=0)), 0))
        .select_from(scores)
        .join(Response, Response.id == scores.c.response_id)
        .where(served, Response.created_at >= since, Response.regenerated.is_(False))
    )
    async with transaction(session):
        rated, liked = (await session.execute(statement)).one()
    return ArmStats(version=version, rated=int(rated), liked=int(liked))


# ------------------------------------------------------------------------------ decision


@dataclass(frozen=True)
class CanaryDecision:
    """What the live votes say now: the decision, the rule that made it, why, and the numbers."""

    decision: Literal["promote", "reject", "waiting"]
    rule: str  # "live" | "timeout" when decided; "min_rated" | "confidence" while waiting
    reason: str  # one sentence for the operator
    numbers: dict[str, Any]  # JSON-ready: both arms (rated, liked, share, interval), probabilities, deadline


def decide(
    current: ArmStats,
    candidate: ArmStats,
    *,
    margin: float,
    min_rated: int,
    confidence: float,
    started_at: datetime,
    now: datetime,
    max_days: float,
    lean_confidence: float = LEAN_CONFIDENCE,
) -> CanaryDecision:
    """Promote, reject or keep waiting, by the rules of the module docstring (pure, deterministic)."""
    not_worse = p_not_worse(current, candidate, margin)
    worse = 1.0 - p_not_worse(current, candidate, 0.0)  # P(candidate < current)
    deadline = started_at + timedelta(days=max_days)
    lean = min(lean_confidence, confidence)
    numbers: dict[str, Any] = {
        "current": _arm_numbers(current, confidence),
        "candidate": _arm_numbers(candidate, confidence),
        "p_not_worse": round(not_worse, 6),
        "p_worse": round(worse, 6),
        "margin": margin,
        "confidence": confidence,
        "lean_confidence": lean,
        "min_rated": min_rated,
        "started_at": started_at.isoformat(timespec="seconds"),
        "deadline": deadline.isoformat(timespec="seconds"),
        "days": round((now - started_at).total_seconds() / 86_400, 3),
    }
    odds = f"P(not worse by more than {margin:.0%}) = {not_worse:.3f}, P(worse) = {worse:.3f}"
    shares = f"👍 {_percent(candidate)} for {candidate.version or 'base'} vs {_percent(current)} for {current.version or 'base'}"
    enough = current.rated >= min_rated and candidate.rated >= min_rated

    def verdict(decision: Literal["promote", "reject", "waiting"], rule: str, reason: str) -> CanaryDecision:
        return CanaryDecision(decision, rule, reason, numbers)

    if enough and not_worse >= confidence:
        return verdict(
            "promote", "live", f"not worse by more than {margin:.0%} at {confidence:.0%}: {shares}; {odds}"
        )
    if enough and worse >= confidence:
        return verdict("reject", "live", f"worse at {confidence:.0%}: {shares}; {odds}")
    if now >= deadline:
        leaning = (
            candidate.share is not None
            and current.share is not None
            and candidate.share < current.share
            and worse >= lean
        )
        if leaning:
            return verdict(
                "reject",
                "timeout",
                f"{max_days:g} days without a decision and the votes lean against it at {lean:.0%}: {shares}; {odds}",
            )
        return verdict(
            "promote",
            "timeout",
            f"{max_days:g} days without a decision: the offline gate's verdict stands ({shares}; {odds})",
        )
    remaining = _days(deadline - now)
    if not enough:
        missing = ", ".join(
            f"{arm.version or 'base'} {arm.rated}/{min_rated}"
            for arm in (candidate, current)
            if arm.rated < min_rated
        )
        return verdict(
            "waiting",
            "min_rated",
            f"waiting for rated answers ({missing}), or the timeout in {remaining}: {shares}",
        )
    return verdict(
        "waiting",
        "confidence",
        f"waiting for {confidence:.0%} either way, or the timeout in {remaining}: {shares}; {odds}",
    )


def _arm_numbers(arm: ArmStats, confidence: float) -> dict[str, Any]:
    a, b = 1 + arm.liked, 1 + arm.disliked
    tail = (1 - confidence) / 2
    return {
        "version": arm.version,
        "rated": arm.rated,
        "liked": arm.liked,
        "share": None if arm.share is None else round(arm.share, 6),
        "interval": [round(_beta_quantile(tail, a, b), 6), round(_beta_quantile(1 - tail, a, b), 6)],
    }


def _percent(arm: ArmStats) -> str:
    return "–" if arm.share is None else f"{arm.share:.0%} of {arm.rated}"


def _days(delta: timedelta) -> str:
    days = delta.total_seconds() / 86_400
    return f"{days:.1f} days" if days >= 1 else f"{days * 24:.1f} hours"


# ------------------------------------------------------------------ Beta posteriors, in math


def p_not_worse(current: ArmStats, candidate: ArmStats, margin: float) -> float:
    """P(rate_candidate − rate_current > −margin) under Beta(1 + liked, 1 + disliked) posteriors."""
    ak, bk = 1 + current.liked, 1 + current.disliked
    ac, bc = 1 + candidate.liked, 1 + candidate.disliked
    # Integrate over the narrower posterior: the other one's CDF is then smooth on its grid.
    if _beta_sd(ac, bc) <= _beta_sd(ak, bk):
        # P(K < C + margin) = E_C[F_K(C + margin)]
        return _expectation(ac, bc, lambda y: _beta_cdf(y + margin, ak, bk))
    # P(C > K − margin) = E_K[1 − F_C(K − margin)]
    return _expectation(ak, bk, lambda x: 1.0 - _beta_cdf(x - margin, ac, bc))


_INTERVALS = 400  # Simpson intervals over ±12 sd of the narrower posterior: errors far below 1e-6


def _expectation(a: float, b: float, g: Callable[[float], float]) -> float:
    """E[g(X)] for X ~ Beta(a, b), g monotone in [0, 1]: Simpson's rule over the bulk, the tails at its edges."""
    mean, sd = a / (a + b), _beta_sd(a, b)
    lo, hi = max(0.0, mean - 12 * sd), min(1.0, mean + 12 * sd)
    step = (hi - lo) / _INTERVALS
    weighted = mass = 0.0
    for i in range(_INTERVALS + 1):
        x = lo + i * step
        weight = 1 if i in (0, _INTERVALS) else (4 if i % 2 else 2)
        density = _beta_pdf(x, a, b)
        mass += weight * density
        weighted += weight * density * g(x)
    if mass <= 0:
        return g(mean)
    below, above = _beta_cdf(lo, a, b), 1.0 - _beta_cdf(hi, a, b)
    bulk = 1.0 - below - above
    # the quadrature's own mass error cancels in the ratio; the tails (≤ 1e-6) take g at the edge
    value = bulk * weighted / mass + below * g(lo) + above * g(hi)
    return min(1.0, max(0.0, value))


def _beta_sd(a: float, b: float) -> float:
    return math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)))


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _beta_pdf(x: float, a: float, b: float) -> float:
    if x <= 0.0 or x >= 1.0:
        # the limits at the edges for a, b ≥ 1 (the only kind a uniform prior gives)
        edge_exponent = a if x <= 0.0 else b
        return math.exp(-_log_beta(a, b)) if edge_exponent == 1 else 0.0
    return math.exp((a - 1) * math.log(x) + (b - 1) * math.log1p(-x) - _log_beta(a, b))


def _beta_cdf(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta function I_x(a, b) (continued fraction, Numerical Recipes §6.4)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(a * math.log(x) + b * math.log1p(-x) - _log_beta(a, b))
    if x < (a + 1) / (a + b + 2):
        return front * _beta_fraction(x, a, b) / a
    return 1.0 - front * _beta_fraction(1.0 - x, b, a) / b


def _beta_fraction(x: float, a: float, b: float) -> float:
    """The continued fraction of I_x(a, b), by the modified Lentz method."""
    tiny, epsilon = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 100_000):
        numerator = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + numerator * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + numerator / c
        c = c if abs(c) > tiny else tiny
        result *= d * c
        numerator = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + numerator * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + numerator / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        result *= delta
        if abs(delta - 1.0) < epsilon:
            break
    return result


def _beta_quantile(q: float, a: float, b: float) -> float:
    """The x with I_x(a, b) = q, by bisection (the CDF is increasing): deterministic, to 1e-13."""
    lo, hi = 0.0, 1.0
    for _ in range(45):
        middle = (lo + hi) / 2
        if _beta_cdf(middle, a, b) < q:
            lo = middle
        else:
            hi = middle
    return (lo + hi) / 2
