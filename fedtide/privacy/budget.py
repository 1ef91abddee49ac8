"""The guard that keeps a client's ε under `target_epsilon`, checked before each DP pass is made."""

from __future__ import annotations

from fedtide.privacy.accounting import epsilon_spent, steps_and_rate
from fedtide.privacy.dp_sgd import ClientPrivacy
from fedtide.scenario.schema import Scenario


class BudgetGuard:
    """Refuses DP passes that would take a client past `target_epsilon`, so ε never exceeds it."""

    def __init__(self, scenario: Scenario, privacy: ClientPrivacy, delta: float) -> None:
        self.privacy = privacy
        self.target = scenario.privacy.target_epsilon
        self.delta = delta
        self.batch_size, self.epochs = scenario.client.batch_size, scenario.client.epochs
        self.exhausted = False

    def allows(self, training: int, other_passes: list[int] = ()) -> bool:
        """Whether a training round over `training` samples (and single passes over others) fits."""
        if self.target is None or self.exhausted:
            return not self.exhausted
        sigma = self.privacy.noise_multiplier
        plan = []
        for size, epochs in [(n, 1) for n in other_passes] + [(training, self.epochs)]:
            steps, rate = steps_and_rate(size, self.batch_size)
            plan.append((sigma, rate, steps * epochs))
        spent = epsilon_spent(self.privacy.history + plan, self.delta, self.privacy.config.accountant)
        self.exhausted = spent > self.target
        return not self.exhausted
