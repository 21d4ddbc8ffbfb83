"""The sticky canary split: the share holds over many users, a user keeps their arm, candidates re-draw."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smolcord.canary import in_canary, served_model

USER_IDS = st.integers(min_value=0, max_value=2**64 - 1)  # Discord snowflakes are 64-bit
VERSIONS = st.integers(min_value=1, max_value=10_000).map(lambda n: f"v{n}")


@settings(max_examples=40)
@given(share=st.floats(min_value=0.02, max_value=0.98), candidate=VERSIONS, start=USER_IDS)
def test_share_is_the_fraction_of_users_in_the_canary(share, candidate, start):
    users = range(start, start + 4000)
    inside = sum(in_canary(user, candidate, share) for user in users) / len(users)
    # 4000 independent draws: the standard error is at most 0.008; six of them is never seen by chance
    assert abs(inside - share) < 0.05


@given(user=USER_IDS, candidate=VERSIONS, share=st.floats(min_value=0, max_value=1))
def test_sticky_and_monotone_in_the_share(user, candidate, share):
    first = in_canary(user, candidate, share)
    assert all(in_canary(user, candidate, share) == first for _ in range(3))
    if first:  # a larger share keeps everyone a smaller one had
        assert in_canary(user, candidate, min(1.0, share + 0.1))


@settings(max_examples=30)
@given(first=VERSIONS, second=VERSIONS, start=USER_IDS)
def test_each_candidate_draws_its_own_users(first, second, start):
    if first == second:
        return
    users = range(start, start + 4000)
    a = {user for user in users if in_canary(user, first, 0.5)}
    b = {user for user in users if in_canary(user, second, 0.5)}
    # independent draws overlap on about a quarter of the users; the same draw would overlap on half
    assert abs(len(a & b) / len(users) - 0.25) < 0.05


def test_edges_and_known_values():
    assert not any(in_canary(user, "v3", 0.0) for user in range(1000))
    assert all(in_canary(user, "v3", 1.0) for user in range(1000))
    # pinned: the bot and the simulation must split users the same way forever
    # (sha256("0:v3") starts 0x1236..., 0.0711 of 2**64: in at 0.2; "1:v3" is 0.468: out)
    assert [in_canary(user, "v3", 0.2) for user in range(12)] == [
        True, False, True, True, False, False, False, False, True, False, False, False
    ]  # fmt: skip
    with pytest.raises(ValueError):
        in_canary(1, "v3", 1.5)


def test_served_model():
    assert (
        served_model("HuggingFaceTB/SmolVLM-256M-Instruct", "v3") == "HuggingFaceTB/SmolVLM-256M-Instruct:v3"
    )
    assert served_model("tiny", None) == "tiny"
