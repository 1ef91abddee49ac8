"""Everything that can be checked about a scenario before Ray or Flower start.

`fedtide validate` runs exactly these checks, and `fedtide run` runs them first, so
a bad strategy name or a missing dataset fails in a second with one line, not
after a simulation has started.
"""

from __future__ import annotations

from fedtide.models import build_scenario_model
from fedtide.privacy.accounting import check_privacy
from fedtide.scenarios.schema import Scenario
from fedtide.scenarios.stream import build_stream, experience_partitions
from fedtide.strategies.aggregation import build_strategy
from fedtide.strategies.continual import build_method, require_dp_compatible


def check_runnable(scenario: Scenario) -> None:
    """Raise `ScenarioError` for anything that would make the run fail at start."""
    build_strategy(scenario.federation, scenario.partition.num_clients)
    method = build_method(scenario.continual)
    if scenario.privacy.private:
        require_dp_compatible(method, scenario.continual.method)
    stream = build_stream(scenario)
    experience_partitions(scenario)
    if scenario.privacy.private:
        check_privacy(scenario)
    build_scenario_model(scenario, stream.data.input_shape)
