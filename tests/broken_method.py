"""A continual method that fails on every client, as a buggy user plugin would."""

from avalanche.training.plugins import SupervisedPlugin

from fedtide.continual.builtin import Naive


class _Explodes(SupervisedPlugin):
    def before_training_exp(self, strategy, **kwargs):
        raise RuntimeError("broken_method exploded on purpose")


class BrokenMethod(Naive):
    name = "broken"

    def plugins(self):
        return [_Explodes()]
