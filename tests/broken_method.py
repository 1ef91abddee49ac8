"""Continual methods that fail on every client, as buggy user plugins would."""

from avalanche.training.plugins import SupervisedPlugin

from fedtide.continual.builtin import Naive


class _Explodes(SupervisedPlugin):
    def before_training_exp(self, strategy, **kwargs):
        raise RuntimeError("broken_method exploded on purpose")


class BrokenMethod(Naive):
    name = "broken"

    def plugins(self):
        return [_Explodes()]


class _NaNLoss(SupervisedPlugin):
    def before_backward(self, strategy, **kwargs):
        strategy.loss = strategy.loss * float("nan")


class NaNLoss(Naive):
    """Training that diverges: every minibatch loss is NaN."""

    name = "nan_loss"

    def plugins(self):
        return [_NaNLoss()]


class BackwardsHook(SupervisedPlugin):
    """Means Avalanche's `before_backward`, misspelt: it would never be called."""

    def before_backwards(self, strategy, **kwargs):
        strategy.loss = strategy.loss * 0.0

    def penalty(self) -> float:
        """An ordinary helper: not a hook, not close to one."""
        return 0.0


class BringsBackwardsHook(Naive):
    """A user's own ContinualMethod whose plugin misspells a hook."""

    name = "brings_backwards_hook"

    def plugins(self):
        return [BackwardsHook()]


class _ForgetsStrategy(SupervisedPlugin):
    def before_backward(self):  # Avalanche calls before_backward(strategy)
        pass


class WrongHookSignature(Naive):
    """A method whose plugin's hook cannot take the strategy Avalanche passes it."""

    name = "wrong_hook"

    def plugins(self):
        return [_ForgetsStrategy()]


class WrongPluginSignature(SupervisedPlugin):
    """A plain Avalanche plugin (the adapter's route) whose hook wants an argument nobody passes."""

    def after_training_exp(self, strategy, buffer):
        pass
