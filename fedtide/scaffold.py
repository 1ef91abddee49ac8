"""`fedtide new strategy|method NAME`: a minimal, runnable, commented plugin and a scenario using it.

The module and the scenario go side by side: a scenario's own folder is importable for
"module:Class" paths (`fedtide.registry.make_importable`), so the new plugin runs
at once with `fedtide run NAME.yaml`, without installing anything or setting PYTHONPATH.
"""

from __future__ import annotations

import keyword
from pathlib import Path
from string import Template

from fedtide.errors import ScenarioError

KINDS = ("strategy", "method")

STRATEGY = Template('''"""$name: an aggregation strategy for fedtide (written by `fedtide new strategy $name`).

Run it:    fedtide run $name.yaml
Check it:  fedtide check-plugin $name:$cls --clients 5
Contract:  fedtide's docs/extending.md ("Strategies")

A strategy is a Flower message-API strategy (`flwr.serverapp.strategy.Strategy`);
subclassing FedAvg keeps its client sampling and configuration. fedtide wraps it in
ContinualStrategy: the train config carries `experience`, and failed or empty
replies are dropped before `aggregate_train` sees them.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg


class $cls(FedAvg):
    """Coordinate-wise trimmed mean: drop the `trim` largest and smallest values of every weight."""

    def __init__(self, trim: int = 1, **fedavg_kwargs) -> None:
        super().__init__(**fedavg_kwargs)  # fraction_train, min_train_nodes... come from the scenario
        self.trim = trim

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Return (new global arrays, metrics); (None, None) keeps the current weights."""
        replies = list(replies)
        _, metrics = super().aggregate_train(server_round, replies)  # FedAvg's weighted train metrics
        if len(replies) <= 2 * self.trim:  # too few replies to trim: keep the weights this round
            return None, metrics
        records = [reply.content["arrays"] for reply in replies]
        trimmed = {}
        for key in records[0]:
            stacked = np.sort(np.stack([record[key].numpy() for record in records]), axis=0)
            kept = stacked[self.trim : len(records) - self.trim]
            trimmed[key] = Array.from_numpy_ndarray(kept.mean(axis=0).astype(stacked.dtype))
        return ArrayRecord(trimmed), metrics
''')

METHOD = Template('''"""$name: a continual-learning method for fedtide (written by `fedtide new method $name`).

Run it:    fedtide run $name.yaml
Check it:  fedtide check-plugin $name:$cls
Contract:  fedtide's docs/extending.md ("Continual methods")

An Avalanche `SupervisedPlugin` is a method as it is: its per-minibatch hooks run
while a round trains, and fedtide calls `after_training_exp` once per experience
(never at the end of a round), at the global weights that ended it. Attributes that
are tensors, numpy arrays, modules, torch.Generators or JSON values are kept in the
client's `Context.state` between rounds; if anything else changes in a round it would be
lost, and fedtide stops the run saying which attribute. Hook names are checked too:
`before_backwards` (not a hook) is refused, naming `before_backward`.
"""

from __future__ import annotations

import torch
from avalanche.training.plugins import SupervisedPlugin


class $cls(SupervisedPlugin):
    """An L2 pull (`strength`) towards the global weights that ended the previous experience."""

    # True only if every pass over private data happens inside the DP-SGD step: this
    # penalty reads parameters only, so it may run under privacy.enabled.
    dp_compatible = True

    def __init__(self, strength: float = 1.0) -> None:
        super().__init__()
        self.strength = strength
        self.anchor: dict[str, torch.Tensor] = {}  # kept between rounds (a dict of tensors)

    def before_backward(self, strategy, **kwargs) -> None:
        """Every minibatch: add the penalty to the loss (strategy.model is the client's model)."""
        if not self.anchor:
            return
        distance = sum(((p - self.anchor[n].to(p.device)) ** 2).sum() for n, p in strategy.model.named_parameters())
        strategy.loss += 0.5 * self.strength * distance

    def after_training_exp(self, strategy, **kwargs) -> None:
        """Consolidation, once per past experience (strategy.experience is the one that ended)."""
        self.anchor = {n: p.detach().clone() for n, p in strategy.model.named_parameters()}
''')

SCENARIO = Template('''# A first run of $name (written by `fedtide new $kind $name`): fedtide run $name.yaml
# The quickstart's data, federation and training (scenarios/quickstart.yaml), so its numbers
# compare with the quickstart's final average accuracy (62% with FedAvg + replay).
$note
name: $name
seed: 0
dataset: {name: digits}
model: {name: mlp}
stream: {n_experiences: 5}
partition: {kind: dirichlet, alpha: 0.5, num_clients: 10}
federation:
  strategy: $strategy
  rounds_per_experience: 3
  fraction_train: 1.0
  fraction_evaluate: 0.0
client: {epochs: 2, batch_size: 32, optimizer: sgd, lr: 0.1}
continual: $continual
resources: {backend: in_process}   # no Ray start-up for a first try; remove to run on Ray
''')

# What the scenario pairs the plugin with, and what to expect of it.
NOTES = {
    "strategy": (
        "# Replay (the quickstart's method) keeps the earlier classes, so the strategy's effect shows\n"
        "# on top of it: compare with --set 'federation.strategy={name: fedavg}'."
    ),
    "method": (
        "# A method that only pulls parameters back (as this template's does) ends near naive's 20% in\n"
        "# class-incremental learning, as EWC does (van de Ven et al. 2022): only a method that\n"
        "# rehearses past data goes far above. Compare: --set 'continual={method: naive}' or\n"
        "# --set 'continual={method: replay, mem_size: 200}'."
    ),
}


def class_name(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.split("_"))


def write_plugin(kind: str, name: str, folder: Path) -> tuple[Path, Path]:
    """Write NAME.py and NAME.yaml into `folder`; refuse a bad name or an existing file."""
    if kind not in KINDS:
        raise ScenarioError("KIND", f"unknown kind '{kind}'", " or ".join(KINDS))
    if not name.isidentifier() or keyword.iskeyword(name) or not name.islower():
        raise ScenarioError("NAME", f"'{name}' is not a lower-case Python module name", "e.g. trimmed_mean")
    module, scenario = folder / f"{name}.py", folder / f"{name}.yaml"
    for path in (module, scenario):
        if path.exists():
            raise ScenarioError("NAME", f"{path} exists already", "choose another name or folder")
    cls = class_name(name)
    plugin = f'"{name}:{cls}"'
    sections = {
        "strategy": (f"{{name: {plugin}, trim: 1}}", "{method: replay, mem_size: 200}"),
        "method": ("{name: fedavg}", f"{{method: {plugin}, strength: 1.0}}"),
    }
    strategy, continual = sections[kind]
    folder.mkdir(parents=True, exist_ok=True)
    module.write_text((STRATEGY if kind == "strategy" else METHOD).substitute(name=name, cls=cls))
    scenario.write_text(
        SCENARIO.substitute(name=name, kind=kind, strategy=strategy, continual=continual, note=NOTES[kind])
    )
    return module, scenario
