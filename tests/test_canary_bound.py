"""The canary audit's bound on ε (Steinke, Nasr & Jagielski 2023) and its guesses, on numbers alone."""

import math

import numpy as np
import pytest
from scipy.stats import binom

from fedtide.audit.canaries import (
    audit_ceiling,
    bound_from_scores,
    epsilon_lower_bound,
    guess_plans,
    guesses,
    p_value,
)
from fedtide.records.summary import CanaryAudit

LEVEL = 0.05


def reference_p_value(m, r, v, epsilon, delta):
    """Steinke et al.'s p-value written out term by term, as their Appendix D loops over it."""
    q = math.exp(epsilon) / (1 + math.exp(epsilon))
    beta = sum(binom.pmf(k, r, q) for k in range(v, r + 1))
    alpha = max((sum(binom.pmf(k, r, q) for k in range(v - i, v)) / i for i in range(1, v + 1)), default=0.0)
    return min(beta + 2 * m * delta * alpha, 1.0)


@pytest.mark.parametrize("r", [1, 4, 5, 10, 40, 100])
def test_all_guesses_right_without_delta_is_the_closed_form(r):
    """P[Binomial(r, q) = r] = q^r = level gives q = level^(1/r) and ε = log(q / (1 - q)), or 0 if negative:
    four right guesses out of four happen by chance more often than 5% (1/16)."""
    q = LEVEL ** (1 / r)
    expected = max(0.0, math.log(q / (1 - q)))
    assert epsilon_lower_bound(200, r, r, 0.0, LEVEL) == pytest.approx(expected, abs=2e-6)
    assert (expected > 0) == (r >= 5)


@pytest.mark.parametrize(("r", "right"), [(2, 1), (40, 20), (100, 50), (100, 30), (10, 0)])
def test_half_the_guesses_right_or_fewer_claim_nothing(r, right):
    assert epsilon_lower_bound(200, r, right, 0.0, LEVEL) == 0.0
    assert epsilon_lower_bound(200, r, right, 1e-4, LEVEL) == 0.0


@pytest.mark.parametrize(("m", "r", "right", "delta"), [(200, 100, 97, 1e-4), (50, 20, 19, 1e-3), (1000, 40, 38, 0.0)])
def test_the_p_value_is_steinke_et_al_s_and_the_bound_rejects_exactly_up_to_itself(m, r, right, delta):
    for epsilon in (0.0, 0.5, 1.7, 3.0):
        assert p_value(m, r, right, epsilon, delta) == pytest.approx(reference_p_value(m, r, right, epsilon, delta))
    epsilon = epsilon_lower_bound(m, r, right, delta, LEVEL)
    assert epsilon > 0
    assert p_value(m, r, right, epsilon, delta) < LEVEL  # what it claims, the statistics support
    assert p_value(m, r, right, epsilon + 1e-4, delta) >= LEVEL  # and no more


def test_the_bound_rises_with_right_guesses_and_falls_with_delta_and_confidence():
    bounds = [epsilon_lower_bound(200, 100, right, 1e-4, LEVEL) for right in range(50, 101)]
    assert all(b >= a for a, b in zip(bounds, bounds[1:]))
    assert bounds[-1] > bounds[-5] > bounds[-20] > 0
    assert epsilon_lower_bound(200, 100, 95, 1e-3, LEVEL) < epsilon_lower_bound(200, 100, 95, 0.0, LEVEL)
    assert epsilon_lower_bound(200, 100, 95, 1e-4, 0.01) < epsilon_lower_bound(200, 100, 95, 1e-4, LEVEL)


@pytest.mark.parametrize(("epsilon", "r"), [(0.0, 40), (1.0, 40), (2.0, 100), (0.5, 200)])
def test_a_mechanism_that_is_exactly_epsilon_dp_is_overclaimed_at_most_at_the_level(epsilon, r):
    """Randomized response at ε guesses right with probability e^ε / (1 + e^ε): the worst ε-DP auditee.

    The chance (exact, over W ~ Binomial(r, q)) that the audit claims more than ε is at most 5%.
    """
    q = math.exp(epsilon) / (1 + math.exp(epsilon))
    overclaimed = [right for right in range(r + 1) if epsilon_lower_bound(2 * r, r, right, 0.0, LEVEL) > epsilon]
    assert overclaimed, "some outcome must exceed ε, or the test could not fail"
    assert binom.sf(min(overclaimed) - 1, r, q) <= LEVEL


def test_guesses_take_the_highest_in_the_lowest_out_and_break_ties_by_canary_order():
    scores = np.array([5.0, -1.0, 3.0, 3.0, -4.0, 0.0])
    included = np.array([True, False, True, False, False, True])
    assert guesses(scores, included, 2, 0) == (2, 2)  # canaries 0 and 2 (2 before 3 at the tie)
    assert guesses(scores, included, 3, 0) == (3, 2)  # + canary 3, out
    assert guesses(scores, included, 1, 2) == (3, 3)  # 0 in; 1 and 4 out, both right
    assert guesses(scores, included, 0, 1) == (1, 1)


def test_guess_plans_are_fixed_by_the_number_of_canaries_and_share_the_level():
    assert guess_plans(200) == [(20, 20), (50, 50), (20, 0), (50, 0)]
    assert all(k_in + k_out <= m for m in (1, 2, 3, 7, 200) for k_in, k_out in guess_plans(m))
    scores = np.arange(200.0)  # perfectly separated: the 100 highest are the included ones
    included = scores >= 100
    epsilon, r, right, k_in, k_out = bound_from_scores(scores, included, 1e-4, 0.95)
    assert (r, right, k_in, k_out) == (100, 100, 50, 50)
    assert epsilon == epsilon_lower_bound(200, 100, 100, 1e-4, LEVEL / 4)  # not at 5%: four plans share it
    assert epsilon < epsilon_lower_bound(200, 100, 100, 1e-4, LEVEL)
    noise = np.random.default_rng(0).permutation(200).astype(float)
    assert bound_from_scores(noise, np.random.default_rng(1).random(200) < 0.5, 1e-4, 0.95)[0] == 0.0


@pytest.mark.parametrize(("m", "delta"), [(200, 1.36e-4), (200, 0.0), (50, 1e-3), (222, 5e-4), (1000, 1e-5), (7, 0.0)])
def test_the_ceiling_is_the_audit_s_bound_when_every_guess_is_right(m, delta):
    """Perfectly separating scores, through the audit's own path, reach the ceiling; no other scores beat it."""
    scores = np.arange(float(m))
    included = scores >= m // 2  # every plan guesses at most m/2 each way, so a perfect attacker gets all right
    epsilon, r, right, _, _ = bound_from_scores(scores, included, delta, 0.95)
    assert right == r
    assert epsilon == audit_ceiling(m, delta, 0.95)
    rng = np.random.default_rng(0)
    for _ in range(20):
        coins = rng.random(m) < 0.5
        noisy = np.where(coins, 1.0, 0.0) + rng.normal(0, rng.choice([0.1, 1.0]), m)
        assert bound_from_scores(noisy, coins, delta, 0.95)[0] <= audit_ceiling(m, delta, 0.95)


def test_without_delta_the_ceiling_is_the_closed_form_of_the_largest_plan():
    """At δ = 0 the most guesses win: 100 right of 100 at 5%/4 gives q = 0.0125^(1/100), ε = log(q / (1 - q))."""
    q = (LEVEL / 4) ** (1 / 100)
    assert audit_ceiling(200, 0.0, 0.95) == pytest.approx(math.log(q / (1 - q)), abs=2e-6)
    assert audit_ceiling(200, 0.0, 0.95) == pytest.approx(3.106, abs=1e-3)


def test_the_ceiling_grows_with_canaries_while_m_delta_is_small_and_falls_with_delta():
    ceilings = {m: audit_ceiling(m, 1.36e-4, 0.95) for m in (50, 100, 200, 400)}
    assert ceilings == pytest.approx({50: 1.563, 100: 2.308, 200: 2.936, 400: 3.412}, abs=1e-3)
    by_delta = [audit_ceiling(200, delta, 0.95) for delta in (0.0, 1e-4, 5e-4, 1e-3, 2e-3)]
    assert by_delta == pytest.approx([3.106, 2.986, 2.101, 1.161, 0.0], abs=1e-3)
    # δ enters as 2·m·δ·α: at δ = 1e-3, more canaries lower the ceiling
    assert audit_ceiling(100, 1e-3, 0.95) > audit_ceiling(200, 1e-3, 0.95) > audit_ceiling(400, 1e-3, 0.95)
    assert audit_ceiling(200, 1.36e-4, 0.99) < ceilings[200]  # more confidence, less reach


@pytest.mark.parametrize("m", [50, 200, 222, 1000])
@pytest.mark.parametrize("clients", [2, 10, 20])
def test_at_the_default_client_level_delta_of_up_to_20_clients_the_audit_can_show_nothing(m, clients):
    """δ = 1 / (10·N): 0.05 for the 2 clients of tests/test_canary_audit.py, 5e-3 for scenarios/privacy_levels.yaml.

    Even with every guess right these canaries cannot reject (ε, δ)-DP at any ε ≥ 0, so a
    client-level run audited there passes "ε lower ≤ ε" whatever it leaked.
    """
    assert audit_ceiling(m, 1 / (10 * clients), 0.95) == 0.0


def test_a_record_is_blind_at_an_epsilon_its_ceiling_does_not_exceed():
    record = dict(canaries=200, included=100, guesses=100, correct=60, guesses_in=50, guesses_out=50, plans=4,
                  confidence=0.95, delta=5e-3, epsilon_lower=0.0, score="s")  # fmt: skip
    assert CanaryAudit(**record, epsilon_ceiling=0.0).blind_at(1.0)
    assert CanaryAudit(**record, epsilon_ceiling=1.0).blind_at(1.0)  # ε lower would have to exceed ε
    assert not CanaryAudit(**record, epsilon_ceiling=2.94).blind_at(1.0)
    assert not CanaryAudit(**record, epsilon_ceiling=0.0).blind_at(None)  # no DP, no ε to violate
    old = CanaryAudit.from_dict(record)  # a summary written before the ceiling existed
    assert old.epsilon_ceiling is None and not old.blind_at(1.0)
    assert list(old.to_dict()) == list(record)  # written back without the key
    assert list(CanaryAudit(**record, epsilon_ceiling=0.0).to_dict())[-2:] == ["epsilon_ceiling", "score"]
