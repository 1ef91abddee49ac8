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
import torch.nn.functional as F
from avalanche.training.plugins import SupervisedPlugin


class $cls(SupervisedPlugin):
    """Rehearsal: keep up to `mem_size` samples of past experiences, an equal share each, and
    add `alpha` times their loss to every minibatch's loss."""

    # Under DP-SGD every pass over private data must happen inside the clipped, noised step;
    # the buffer's loss is a pass outside it, so this method is refused under privacy.enabled.
    dp_compatible = False

    def __init__(self, mem_size: int = 200, alpha: float = 1.0, replay_batch: int = 32) -> None:
        super().__init__()
        self.mem_size, self.alpha, self.replay_batch = mem_size, alpha, replay_batch
        # kept between rounds: tensors, a JSON value and a generator are all stored
        self.inputs = torch.empty(0)
        self.targets = torch.empty(0, dtype=torch.long)
        self.owner = torch.empty(0, dtype=torch.long)  # which experience each buffered sample came from
        self.experiences_seen = 0
        self.generator = torch.Generator().manual_seed(0)

    def before_backward(self, strategy, **kwargs) -> None:
        """Every minibatch: add the loss on a random draw from the buffer (strategy.model is the client's)."""
        if len(self.targets) == 0:
            return
        pick = torch.randint(len(self.targets), (self.replay_batch,), generator=self.generator)
        inputs, targets = self.inputs[pick].to(strategy.device), self.targets[pick].to(strategy.device)
        strategy.loss += self.alpha * F.cross_entropy(strategy.model(inputs), targets)

    def after_training_exp(self, strategy, **kwargs) -> None:
        """Consolidation, once per past experience (strategy.experience is the one that ended)."""
        dataset = strategy.experience.dataset
        if len(dataset) == 0:  # this client held no data of that experience
            return
        self.experiences_seen += 1
        share = self.mem_size // self.experiences_seen
        keep = torch.zeros(len(self.owner), dtype=torch.bool)  # the first `share` of each past experience
        for past in range(self.experiences_seen - 1):
            keep[torch.nonzero(self.owner == past).flatten()[:share]] = True
        chosen = torch.randperm(len(dataset), generator=self.generator)[:share].tolist()
        samples = [dataset[i] for i in chosen]  # (input, target, task label)
        new_inputs = torch.stack([sample[0] for sample in samples])
        new_targets = torch.tensor([int(sample[1]) for sample in samples], dtype=torch.long)
        # the empty buffer has no input shape yet
        self.inputs = torch.cat([self.inputs[keep], new_inputs]) if len(self.owner) else new_inputs
        self.targets = torch.cat([self.targets[keep], new_targets])
        self.owner = torch.cat([self.owner[keep], torch.full((len(samples),), self.experiences_seen - 1)])
''')

SCENARIO = Template('''# A first run of $name (written by `fedtide new $kind $name`): fedtide run $name.yaml
# The quickstart's data, federation and training (scenarios/quickstart.yaml), so its numbers
# compare with the quickstart's final average accuracy with FedAvg + replay (docs/results.md).
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
        "# The template rehearses a small buffer, as the quickstart's replay does, so it ends near its\n"
        "# accuracy; without rehearsal, class-incremental learning ends near naive's 20% (van de Ven\n"
        "# et al. 2022). Compare: --set 'continual={method: naive}' or\n"
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
        "method": ("{name: fedavg}", f"{{method: {plugin}, mem_size: 200, alpha: 1.0}}"),
    }
    strategy, continual = sections[kind]
    folder.mkdir(parents=True, exist_ok=True)
    module.write_text((STRATEGY if kind == "strategy" else METHOD).substitute(name=name, cls=cls))
    scenario.write_text(
        SCENARIO.substitute(name=name, kind=kind, strategy=strategy, continual=continual, note=NOTES[kind])
    )
    return module, scenario
