"""An empirical lower bound on ε from one training run (Steinke, Nasr & Jagielski 2023).

The run trained on each of m canaries (`fedtide.data.canaries`) with probability 1/2,
by a fair coin. After it, the final global model scores every canary by how much more
log-probability it gives the canary's (wrong) label than its image's own class, in
float64 as `sample_losses` computes losses (`canary_scores`). An auditor guesses "in"
for the k₊ highest scores, "out" for the k₋ lowest, abstains on the rest, and is right
W times out of r = k₊ + k₋.

If the run is (ε, δ)-DP with respect to each canary, W can hardly beat randomized
response: Steinke et al.'s Corollary 5.4 (their Appendix D computes it) bounds

    P[W ≥ v] ≤ P[Binomial(r, q) ≥ v] + 2·m·δ·α,   q = e^ε / (1 + e^ε),
    α = max over i = 1..v of P[v − i ≤ Binomial(r, q) < v] / i.

ε_lower is the largest ε that this p-value rejects at the configured confidence (found
by bisection, keeping the bracket's low end, whose p-value is known to be below the
level): a run whose accountant reports less than ε_lower is, with that confidence, not
(ε, δ)-DP. It is a lower bound, often far below the accountant's ε: this auditor sees
only the final model, and its canaries are ordinary samples rather than worst cases.

Every canary sits in one client's data, and every client's DP-SGD is (ε_c, δ)-DP on its
own data by its own accountant; the rest of the federation only post-processes what
that client sends, so each canary's coin is protected at the largest ε_c — the ε the
summary reports (`privacy.epsilon_max`) — at the sample-level δ (`client_delta`).
Client-level DP protects a client's whole data, but a canary's coin changes one sample of
that data: under replace-one adjacency that is one neighbouring step (ε, δ); under
add/remove or zero-out it is two (remove the client's data, add it back with or without
the canary), so by group privacy (2ε, (1 + e^ε)·δ) (`canary_guarantee`). Under both
levels both hold, so the canaries are audited at the larger δ against the smaller ε: (ε,
δ)-DP implies (ε, δ')-DP for δ' ≥ δ. A non-private run has no ε, and is audited at the δ
a sample-level DP run of the same scenario would use (`privacy.delta`, else 1 / (10 · the
largest client dataset)).

The guesses are not tuned after seeing the scores, which would inflate the bound: the
(k₊, k₋) pairs of `guess_plans` are fixed by m alone, each is tested at (1 − confidence)
/ (number of pairs) (a union bound), and the best of them is reported.

The audit's reach is limited by m, δ and the confidence alone: even an attacker right on
every guess gets only ε_lower = `audit_ceiling` (the best plan, all r guesses right). A run
whose ε is at or above its ceiling could not have been caught overstating its privacy by
this audit, whatever the scores. δ enters the p-value as 2·m·δ·α, so the ceiling falls as
δ grows, to 0 at δ's of the size client-level DP uses by default (1 / (10 · N) for tens of
clients), and more canaries raise it only while m·δ stays small (README, "Canary audit").
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.stats import binom

from fedtide.audit.membership import sample_losses
from fedtide.data.canaries import Canaries
from fedtide.data.datasets import load_dataset
from fedtide.data.stream_plan import stream_plan
from fedtide.privacy.accounting import client_delta
from fedtide.privacy.client_level import client_level_delta
from fedtide.records.summary import CanaryAudit
from fedtide.scenario.schema import Scenario

# Fractions of the m canaries guessed on, as (in, out): guess few or many, both ways or "in" only.
# "in"-only guesses keep their power when early experiences are forgotten (canaries in and
# out of them then score alike, low); guessing both ways doubles r when nothing is forgotten.
GUESS_FRACTIONS = ((0.1, 0.1), (0.25, 0.25), (0.1, 0.0), (0.25, 0.0))
SCORE = "log p(canary label) - log p(image's class) under the final model"
_EPSILON_SEARCH_LIMIT = 100.0  # no run of r ≤ 10⁶ guesses can reject more than this


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Probability of v or more right guesses out of r, m canaries, under (ε, δ)-DP (Corollary 5.4)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    beta = float(binom.sf(v - 1, r, q))
    if delta == 0 or v == 0:
        return min(beta, 1.0)
    below = binom.cdf(v - 1, r, q) - binom.cdf(v - 1 - np.arange(1, v + 1), r, q)  # P[v-i <= B < v], i = 1..v
    alpha = float(np.max(below / np.arange(1, v + 1)))
    return min(beta + 2 * m * delta * alpha, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, significance: float) -> float:
    """The largest ε (to 1e-6) whose (ε, δ)-DP the observation rejects at level `significance`; 0 if none."""
    if p_value(m, r, v, 0.0, delta) >= significance:
        return 0.0
    low, high = 0.0, 1.0
    while high < _EPSILON_SEARCH_LIMIT and p_value(m, r, v, high, delta) < significance:
        low, high = high, 2 * high
    if high >= _EPSILON_SEARCH_LIMIT:
        return low
    while high - low > 1e-6:
        middle = (low + high) / 2
        low, high = (middle, high) if p_value(m, r, v, middle, delta) < significance else (low, middle)
    return low


def guess_plans(m: int) -> list[tuple[int, int]]:
    """The (k₊, k₋) pairs tried for m canaries, from `GUESS_FRACTIONS` (at least one guess each, r ≤ m)."""
    plans = []
    for take_in, take_out in GUESS_FRACTIONS:
        plan = (max(1, round(take_in * m)), round(take_out * m) if take_out else 0)
        if sum(plan) <= m and plan not in plans:
            plans.append(plan)
    return plans


def plan_significance(m: int, confidence: float) -> float:
    """The level each plan of `guess_plans(m)` is tested at: 1 − confidence shared among them (a union bound)."""
    return (1 - confidence) / len(guess_plans(m))


def audit_ceiling(m: int, delta: float, confidence: float) -> float:
    """The largest ε_lower that m canaries can show at δ and `confidence`: every guess right, the best plan.

    The coins may leave fewer canaries in (or out) than a plan guesses, and then that plan
    cannot be all right: the ceiling is over every outcome of the coins.
    """
    significance = plan_significance(m, confidence)
    return max(epsilon_lower_bound(m, r, r, delta, significance) for r in map(sum, guess_plans(m)))


def guesses(scores: np.ndarray, included: np.ndarray, k_in: int, k_out: int) -> tuple[int, int]:
    """(r, W): "in" for the k_in highest scores, "out" for the k_out lowest; ties go by canary order."""
    order = np.argsort(-scores, kind="stable")
    right = int(included[order[:k_in]].sum())
    if k_out:
        right += int((~included[order[len(order) - k_out :]]).sum())
    return k_in + k_out, right


def bound_from_scores(
    scores: np.ndarray, included: np.ndarray, delta: float, confidence: float
) -> tuple[float, int, int, int, int]:
    """(ε_lower, r, W, k₊, k₋): the best plan of `guess_plans`, each tested at (1 − confidence) / plans.

    Among plans with the same bound (0 included) the first is reported.
    """
    m = len(scores)
    significance = plan_significance(m, confidence)
    best = None
    for k_in, k_out in guess_plans(m):
        r, right = guesses(scores, included, k_in, k_out)
        epsilon = epsilon_lower_bound(m, r, right, delta, significance)
        if best is None or epsilon > best[0]:
            best = (epsilon, r, right, k_in, k_out)
    return best


def canary_scores(model: torch.nn.Module, canaries: Canaries, images: torch.Tensor) -> np.ndarray:
    """Each canary's score: log p(its label) − log p(its image's class) under `model`, in float64.

    High means memorised. Both classes are of the canary's experience, so the bias that
    class-incremental training puts on an experience's classes as a whole (old ones
    forgotten, the last one favoured) cancels out of the difference.
    """
    return sample_losses(model, images, torch.from_numpy(canaries.true_class)) - sample_losses(
        model, images, torch.from_numpy(canaries.label)
    )


def canary_guarantee(
    scenario: Scenario, sample_epsilon: float | None, client_epsilon: float | None
) -> tuple[float | None, float]:
    """(ε, δ) that protect one canary's coin, from the run's ε's (see the module docstring)."""
    guarantees = []
    if sample_epsilon is not None:
        guarantees.append((sample_epsilon, client_delta(scenario)))
    if client_epsilon is not None:
        delta = client_level_delta(scenario)
        if scenario.privacy.client_level.adjacency == "replace_one":
            guarantees.append((client_epsilon, delta))
        else:
            guarantees.append((2 * client_epsilon, (1 + math.exp(client_epsilon)) * delta))
    if not guarantees:
        return None, client_delta(scenario)
    return min(e for e, _ in guarantees), max(d for _, d in guarantees)


def audit_canaries(
    scenario: Scenario, model: torch.nn.Module, sample_epsilon: float | None, client_epsilon: float | None
) -> CanaryAudit | None:
    """The canary audit of the final model against the run's ε's; None when the scenario has no canaries."""
    canaries = stream_plan(scenario).canaries
    if canaries is None:
        return None
    data = load_dataset(scenario.dataset.name, scenario.dataset.root)
    scores = canary_scores(model.cpu(), canaries, data.test_x[torch.from_numpy(canaries.image)])
    epsilon_audited, delta = canary_guarantee(scenario, sample_epsilon, client_epsilon)
    confidence = scenario.audit.confidence
    epsilon, r, right, k_in, k_out = bound_from_scores(scores, canaries.included, delta, confidence)
    return CanaryAudit(
        canaries=len(canaries),
        included=int(canaries.included.sum()),
        guesses=r,
        correct=right,
        guesses_in=k_in,
        guesses_out=k_out,
        plans=len(guess_plans(len(canaries))),
        confidence=confidence,
        delta=delta,
        epsilon_lower=epsilon,
        epsilon_ceiling=audit_ceiling(len(canaries), delta, confidence),
        epsilon_audited=epsilon_audited,
        score=SCORE,
    )
