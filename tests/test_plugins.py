"""User plugins without forking: entry points, the SupervisedPlugin adapter, stock Avalanche plugins, errors.

Everything here runs in-process (no Ray): clients through `run_training_round`, the
function the ClientApp calls, with the state deep-copied between calls as Ray does.
The examples package (`pip install -e examples`, done by `make install`) provides
the entry points `experience_momentum` and `l2_anchor`.
"""

import copy
import json
import tempfile
from importlib.metadata import EntryPoint
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from avalanche.training.plugins import SupervisedPlugin
from fedtide_examples.method import L2Anchor
from fedtide_examples.strategy import ExperienceMomentum
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from fedtide import registry
from fedtide.cli.check_plugin import check_plugin
from fedtide.client.schedule import train_schedule
from fedtide.client.state import METHOD_ARRAYS_KEY, METHOD_LAYOUT_KEY
from fedtide.client.training import RoundTask, run_training_round
from fedtide.continual.hooks import misspelt_hooks
from fedtide.continual.methods import all_methods, build_method, method_class
from fedtide.continual.plugin_adapter import PluginMethod
from fedtide.continual.state_check import LostState
from fedtide.continual.state_codec import encode
from fedtide.data.stream_plan import stream_plan
from fedtide.errors import ScenarioError, SignatureError, failure_line
from fedtide.runner.validation import check_runnable
from fedtide.scenario.loading import parse_scenario
from fedtide.server.federation import train_config
from fedtide.server.strategies import build_strategy, strategy_class
from tests.broken_method import WrongPluginSignature, _Explodes, _ForgetsStrategy
from tests.broken_strategy import ForgetsServerRound, NaNStrategy
from tests.conftest import flat, initial_arrays, small_scenario, stored_method_state

SCHEDULE = [(e, 2 * e + k + 1) for e in range(3) for k in range(2)]  # 3 experiences x 2 rounds


def drive(scenario, partition_id, schedule=SCHEDULE):
    """Train one client through `schedule`; return [(arrays sent, reply, state after)] per round."""
    return train_schedule(scenario, partition_id, schedule, initial_arrays(scenario))


def method_state(state) -> dict[str, np.ndarray]:
    """The stored method state, each table of tensors flattened to `table.i` arrays (i: position)."""
    flat: dict[str, np.ndarray] = {}
    for key, value in stored_method_state(state).items():
        items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        for i, item in enumerate(items or []):
            flat[f"{key}.{i}"] = np.asarray(item.data if hasattr(item, "data") else item)
    return flat


# --- names: entry points, clash rule, broken entry points ------------------------------------


def test_entry_point_names_resolve_to_the_examples_with_their_parameters():
    assert strategy_class("experience_momentum") is ExperienceMomentum
    scenario = small_scenario(federation={"strategy": {"name": "experience_momentum", "momentum": 0.5}})
    strategy = build_strategy(scenario.federation, num_clients=4)
    assert (type(strategy), strategy.momentum, strategy.server_lr) == (ExperienceMomentum, 0.5, 1.0)
    method = build_method(small_scenario(continual={"method": "l2_anchor", "strength": 3.0}).continual)
    assert isinstance(method, PluginMethod) and type(method.plugin) is L2Anchor
    assert method.plugin.strength == 3.0 and method.dp_compatible


def test_built_in_names_win_over_entry_points_and_broken_entry_points_name_themselves(monkeypatch):
    group = "fedtide.strategies"
    points = {
        "fedavg": EntryPoint("fedavg", "tests.broken_strategy:NaNStrategy", group),
        "nan": EntryPoint("nan", "tests.broken_strategy:NaNStrategy", group),
        "gone": EntryPoint("gone", "no_such_module:Thing", group),
        "wrong": EntryPoint("wrong", "tests.broken_strategy:NotAStrategy", group),
    }
    monkeypatch.setattr(registry, "plugin_entry_points", lambda _: points)
    assert strategy_class("fedavg") is FedAvg
    assert strategy_class("nan") is NaNStrategy
    with pytest.raises(ScenarioError) as gone:
        strategy_class("gone")
    assert str(gone.value).startswith("federation.strategy.name: entry point 'gone' = 'no_such_module:Thing'")
    assert "cannot be loaded: ModuleNotFoundError" in str(gone.value)
    with pytest.raises(ScenarioError) as wrong:
        strategy_class("wrong")
    assert "entry point 'wrong'" in str(wrong.value)
    assert "is not a subclass of flwr.serverapp.strategy.strategy.Strategy" in str(wrong.value)


def test_one_resolver_names_every_kind_and_tells_check_plugin_which_kind_a_name_is():
    """Strategies and methods resolve through `registry.resolve` in one order; built-ins are plugin-backed."""
    from fedtide.continual.methods import METHOD
    from fedtide.server.strategies import STRATEGY

    kinds = (STRATEGY, METHOD)
    assert registry.resolve(STRATEGY, "FedAvg") is FedAvg
    assert registry.resolve(METHOD, "l2_anchor").plugin_class is L2Anchor
    named = ["fedavg", "experience_momentum", "fedtide_examples.strategy:ExperienceMomentum", "ewc", "mas", "l2_anchor"]
    named.append("fedtide_examples.method:L2Anchor")
    assert [registry.kind_of(name, kinds) for name in named] == [STRATEGY] * 3 + [METHOD] * 4
    with pytest.raises(ScenarioError, match="'nope' is no strategy and no method fedtide knows"):
        registry.kind_of("nope", kinds)
    with pytest.raises(ScenarioError, match="unknown method 'nope'.*one of naive, replay, ewc, lwf, mas"):
        registry.resolve(METHOD, "nope")
    assert all(issubclass(all_methods()[name], PluginMethod) for name in ("replay", "ewc", "lwf"))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["continual.method=no_such_pkg.mod:Method"], "continual.method: cannot import 'no_such_pkg.mod'"),
        (["continual.method=tests.broken_strategy:NotAStrategy"], "continual.method: 'tests.broken_strategy:NotAS"),
        (["federation.strategy.name=tests.broken_strategy:NotAStrategy"], "is not a subclass of flwr.serverapp"),
        (["continual.method=l2_anchor", "continual.pull=1"], "continual.pull: L2Anchor takes no parameter 'pull'"),
        (["continual.method=mas", "continual.lambda=1"], "continual.lambda: MAS takes no parameter 'lambda'"),
        (
            ["federation.strategy.name=experience_momentum", "federation.strategy.beta=0.9"],
            "federation.strategy.beta: ExperienceMomentum takes no parameter 'beta'",
        ),
        (["continual.method=gem_typo"], "continual.method: unknown method 'gem_typo'"),
        (
            ["privacy.enabled=true", "privacy.noise_multiplier=1.0", "continual.method=agem"],
            "continual.method: 'agem' is not DP-compatible",
        ),
        (
            ["privacy.enabled=true", "privacy.noise_multiplier=1.0", "continual.method=mas"],
            "continual.method: 'mas' is not DP-compatible",
        ),
        (
            ["privacy.enabled=true", "privacy.noise_multiplier=1.0", "continual.method=gem"],
            "continual.method: 'gem' is not DP-compatible",
        ),
    ],
)
def test_bad_plugins_are_one_line_and_exit_2_before_the_run(run_cli, overrides, expected):
    args = [a for o in overrides for a in ("--set", o)]
    code, out, err = run_cli("validate", "scenarios/quickstart.yaml", *args)
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert expected in err
    assert "Traceback" not in err + out


@pytest.mark.parametrize(
    ("override", "hook", "expected"),
    [
        (
            "continual.method=tests.broken_method:WrongPluginSignature",
            WrongPluginSignature.after_training_exp,
            "continual.method: WrongPluginSignature.after_training_exp ({at}) cannot take the arguments it is "
            "called with: (strategy) (define it as def after_training_exp(self, strategy, *args, **kwargs))",
        ),
        (
            "federation.strategy.name=tests.broken_strategy:ForgetsServerRound",
            ForgetsServerRound.aggregate_train,
            "federation.strategy.name: ForgetsServerRound.aggregate_train ({at}) cannot take the arguments it is "
            "called with: (server_round, replies) (define it as def aggregate_train(self, server_round, replies))",
        ),
    ],
)
def test_a_hook_whose_def_cannot_take_its_arguments_is_refused_naming_the_def(run_cli, override, hook, expected):
    """Avalanche (or fedtide) would call it from its own frame: the traceback would name learner.py, not the def."""
    code, out, err = run_cli("validate", "scenarios/quickstart.yaml", "--set", override)
    module = "broken_method" if "method" in override else "broken_strategy"
    at = f"{module}.py:{hook.__code__.co_firstlineno}, in {hook.__name__}"
    assert code == 2 and " ".join(err.split()) == "error: " + expected.format(at=at)


def test_a_methods_plugin_with_a_wrong_hook_def_fails_its_client_naming_the_def():
    """A `ContinualMethod`'s plugins exist only on the client: its round fails, one line naming the def."""
    scenario = small_scenario(continual={"method": "tests.broken_method:WrongHookSignature"})
    with pytest.raises(SignatureError) as raised:
        run_training_round(RoundTask(scenario, 0, 0, 1), initial_arrays(scenario), RecordDict())
    line = failure_line(raised.value)
    at = f"broken_method.py:{_ForgetsStrategy.before_backward.__code__.co_firstlineno}, in before_backward"
    assert line == (
        f"continual.method: _ForgetsStrategy.before_backward ({at}) cannot take the arguments it is called with: "
        "(strategy) (define it as def before_backward(self, strategy, *args, **kwargs))"
    )


def test_dp_compatible_plugin_is_accepted_under_dp_and_list_shows_dp_status(run_cli):
    dp = ["--set", "privacy.enabled=true", "--set", "privacy.noise_multiplier=1.0"]
    code, out, _ = run_cli("validate", "scenarios/quickstart.yaml", "--set", "continual.method=l2_anchor", *dp)
    assert code == 0 and "l2_anchor" in out
    # noise 0 is the non-private point: any method runs
    check_runnable(small_scenario(continual={"method": "mas"}, privacy={"enabled": True, "noise_multiplier": 0}))
    code, out, _ = run_cli("list")
    lines = " ".join(out.split())
    assert code == 0
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in out.splitlines() if line.count("│") == 4]
    dp_column = {row[0]: row[2] for row in cells if row[0]}  # first line of each row of continual.method
    expected = {"naive": "yes", "replay": "yes", "ewc": "yes", "lwf": "yes"}
    expected |= {"mas": "no", "si": "yes", "rwalk": "no", "gem": "no", "agem": "no"}
    assert {k: dp_column[k] for k in expected} == expected
    assert dp_column["l2_anchor"].startswith("see")
    assert "experience_momentum" in out and "l2_anchor" in out and "check-plugin" in lines


def test_a_client_refuses_a_non_dp_method_under_dp_even_without_validation():
    scenario = small_scenario(continual={"method": "mas"}, privacy={"enabled": True, "noise_multiplier": 1.0})
    with pytest.raises(ScenarioError, match="'mas' is not DP-compatible"):
        run_training_round(RoundTask(scenario, 0, 0, 1), initial_arrays(scenario), RecordDict())


# --- stock Avalanche plugins: once per experience, state across rounds ------------------------


def test_mas_consolidates_once_per_experience_at_the_global_weights_and_keeps_state():
    scenario = small_scenario(continual={"method": "mas", "lambda_reg": 1.0})
    rounds = drive(scenario, 1)
    assert [int(r["client"]["consolidated"]) for _, r, _ in rounds] == [0, 0, 1, 0, 1, 0]
    assert list(rounds[-1][1]["client"]["consolidation_counts"]) == [1, 1, 0]
    names = list(initial_arrays(scenario).keys())  # MLP parameters, in order
    after_first = method_state(rounds[2][2])
    assert sorted(after_first) == sorted([f"params.{i}" for i in range(6)] + [f"importance.{i}" for i in range(6)])
    # the anchor is the global model received in the first round of experience 1 ...
    for i, name in enumerate(names):
        assert np.array_equal(after_first[f"params.{i}"], rounds[2][0][name].numpy())
    assert all((after_first[f"importance.{i}"] >= 0).all() for i in range(6))
    assert sum(after_first[f"importance.{i}"].sum() for i in range(6)) > 0
    # ... kept unchanged through the second round of that experience (no re-consolidation)
    after_second = method_state(rounds[3][2])
    assert all(np.array_equal(after_first[k], after_second[k]) for k in after_first)
    # and replaced at the next experience's first round
    assert not np.array_equal(after_first["params.0"], method_state(rounds[4][2])["params.0"])


@pytest.mark.parametrize(
    "continual",
    [
        {"method": "mas", "lambda_reg": 1.0},
        {"method": "si", "si_lambda": 1000.0},
        {"method": "rwalk", "ewc_lambda": 2.0, "delta_t": 2},
    ],
)
def test_importance_penalties_pull_training_towards_the_anchor(continual):
    naive = drive(small_scenario(continual={"method": "naive"}), 1, SCHEDULE[:4])
    penalised = drive(small_scenario(continual=continual), 1, SCHEDULE[:4])
    anchor = flat(penalised[2][0])  # the weights received when experience 0 was consolidated
    trained, plain = flat(penalised[3][1]["arrays"]), flat(naive[3][1]["arrays"])
    assert not np.allclose(plain, trained)
    assert np.linalg.norm(trained - anchor) < np.linalg.norm(plain - anchor)


def test_si_integrates_the_path_over_every_round_of_an_experience_and_consolidates_once():
    """Avalanche's SI restarts its integral and anchor at every train(); fedtide's spans the experience."""
    rounds = drive(small_scenario(continual={"method": "si", "si_lambda": 1.0}), 1)
    assert [int(r["client"]["consolidated"]) for _, r, _ in rounds] == [0, 0, 1, 0, 1, 0]
    states = [method_state(state) for _, _, state in rounds]

    def table(state, kind):
        return np.concatenate([state[f"{kind}.{i}"] for i in range(6)])

    start = flat(rounds[0][0])  # the model the client first trained from
    assert np.array_equal(table(states[0], "anchor"), start) and np.array_equal(table(states[1], "anchor"), start)
    # plain SGD makes every step's grad·Δθ = -lr·grad² <= 0: round 2 adds to round 1's integral
    first, second = table(states[0], "trajectory"), table(states[1], "trajectory")
    assert (second <= first).all() and second.sum() < first.sum() < 0
    # consolidated at experience 1: the integral over both rounds, divided by the squared move of
    # the global model over experience 0, capped at 0.001 as Avalanche does (Zenke et al. 2017, eq. 5)
    end = flat(rounds[2][0])
    expected = np.minimum(-second / ((end - start) ** 2 + 1e-7), 0.001)
    assert np.allclose(table(states[2], "importance"), expected, rtol=1e-4, atol=1e-10)
    assert (expected > 0).sum() > 100
    assert np.array_equal(table(states[2], "anchor"), end)
    # the integral restarted at the consolidation (a continued one could only decrease), and the
    # importance is kept through the next round
    assert (table(states[2], "trajectory") > second).any()
    assert np.array_equal(table(states[3], "importance"), table(states[2], "importance"))


@pytest.mark.parametrize(
    "continual",
    [
        {"method": "gem", "patterns_per_experience": 16, "memory_strength": 0.5},
        {"method": "agem", "patterns_per_experience": 16, "sample_size": 16},
    ],
)
def test_gem_and_agem_memories_are_sample_ids_of_each_past_experience_and_shape_training(continual):
    scenario = small_scenario(continual=continual)
    rounds = drive(scenario, 3)
    assert [int(r["client"]["consolidated"]) for _, r, _ in rounds] == [0, 0, 1, 0, 1, 0]
    own = stream_plan(scenario).client(3).experiences
    state = method_state(rounds[-1][2])
    table = "memory_ids" if continual["method"] == "gem" else "buffer_ids"
    assert sorted(state) == [f"{table}.0", f"{table}.1"]
    for e in (0, 1):
        mine = set(own[e].train.tolist())
        ids = state[f"{table}.{e}"]
        assert len(ids) == min(16, len(mine)) and set(ids.tolist()) <= mine
    # the memory of experience 0 is drawn once and restored unchanged in the next round
    assert np.array_equal(method_state(rounds[3][2])[f"{table}.0"], method_state(rounds[2][2])[f"{table}.0"])
    # and it is used: the projected gradients give other weights than plain fine-tuning
    naive = drive(small_scenario(continual={"method": "naive"}), 3, SCHEDULE[:4])
    assert not np.allclose(flat(naive[3][1]["arrays"]), flat(rounds[3][1]["arrays"]))


def test_rwalk_scores_every_round_of_an_experience_and_consolidates_once():
    """Avalanche's RWalk zeroes its scores at every train() and scores only whole delta_t windows."""
    scenario = small_scenario(continual={"method": "rwalk", "delta_t": 1000})  # windows end only with rounds
    rounds = drive(scenario, 1)
    assert [int(r["client"]["consolidated"]) for _, r, _ in rounds] == [0, 0, 1, 0, 1, 0]

    def table(state, kind):
        return np.concatenate([method_state(state)[f"{kind}.{i}"].ravel() for i in range(6)])

    first = table(rounds[0][2], "checkpoint_scores")
    assert np.abs(first).sum() > 0  # the round's one, partial window was scored at its end
    # round 2 adds to round 1's scores: run round 2 again from round 1's state with the scores zeroed
    state = copy.deepcopy(rounds[0][2])
    zeroed = stored_method_state(state)
    zeroed["checkpoint_scores"] = {name: torch.zeros_like(t) for name, t in zeroed["checkpoint_scores"].items()}
    state[METHOD_ARRAYS_KEY], state[METHOD_LAYOUT_KEY] = encode(zeroed)
    run_training_round(RoundTask(scenario, 1, 0, 2), rounds[1][0], state)
    second = table(rounds[1][2], "checkpoint_scores")
    assert np.allclose(second, first + table(state, "checkpoint_scores"), rtol=1e-5, atol=1e-6)
    # consolidated at experience 1's first round: penalties at the received global weights, scores restarted
    consolidated = method_state(rounds[2][2])
    for i, name in enumerate(initial_arrays(scenario).keys()):
        assert np.array_equal(consolidated[f"exp_params.{i}"], rounds[2][0][name].numpy())
    penalties = np.concatenate([consolidated[f"exp_penalties.{i}"].ravel() for i in range(6)])
    assert penalties.min() >= 0 and 1.0 <= penalties.max() <= 2.0  # importance and score, each scaled to [0, 1]
    assert not np.allclose(table(rounds[2][2], "checkpoint_scores"), second)


# --- a user's SupervisedPlugin ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["l2_anchor", "fedtide_examples.method:L2Anchor"])
def test_user_supervised_plugin_consolidates_once_and_its_attributes_persist(name):
    scenario = small_scenario(continual={"method": name, "strength": 5.0})
    rounds = drive(scenario, 0)
    # the plugin's own counter of after_training_exp calls, restored from Context.state every round
    assert [stored_method_state(rnd[2])["consolidations"] for rnd in rounds] == [0, 0, 1, 1, 2, 2]
    anchor = method_state(rounds[2][2])
    names = [k for k in initial_arrays(scenario).keys()]
    assert sorted(anchor) == sorted(f"anchor.{i}" for i in range(len(names)))
    for i, key in enumerate(names):
        assert np.array_equal(anchor[f"anchor.{i}"], rounds[2][0][key].numpy())


# --- nothing a method changes in a round is lost silently ----------------------------------------

LOST = "tests.lost_state_plugins"


def lost_state_error(plugin: str, schedule=SCHEDULE[:1]) -> str:
    """The one-line error of a client whose method would lose what a round changed."""
    with pytest.raises(LostState) as failed:
        drive(small_scenario(continual={"method": f"{LOST}:{plugin}"}), 0, schedule)
    assert len(str(failed.value).splitlines()) == 1
    return str(failed.value)


def test_a_buffer_filled_in_training_but_left_out_of_state_dict_stops_the_first_round_naming_it():
    message = lost_state_error("ListBuffer")
    assert message.startswith(f"continual method '{LOST}:ListBuffer' would lose state: ListBuffer.buffer ")
    assert "changed during the round but is not restored from state_dict()" in message
    assert "return it from state_dict() and set it back in load_state_dict()" in message
    assert "consolidations" not in message  # stored by its state_dict()


def test_a_run_stops_at_the_first_round_that_would_lose_state_even_if_an_empty_client_succeeded(run_cli, tmp_path):
    """Client 6 of this partition holds no data in experience 0: it trains nothing, loses nothing, and replies."""
    scenario = small_scenario(
        seed=1,
        partition={"kind": "dirichlet", "alpha": 0.05, "num_clients": 20},
        continual={"method": f"{LOST}:ListBuffer"},
        resources={"backend": "in_process"},
    )
    assert stream_plan(scenario).client(6).sizes[0] == 0
    path = tmp_path / "lost.yaml"
    path.write_text(yaml.safe_dump(scenario.model_dump(mode="json")))
    code, out, err = run_cli("run", str(path), "--output", str(tmp_path / "runs"))
    message = " ".join(err.split())
    assert code == 1, out + err
    assert f"in round 1: continual method '{LOST}:ListBuffer' would lose state: ListBuffer.buffer" in message
    assert "Traceback" not in out + err


def test_a_buffer_in_a_plain_object_is_refused_as_unstorable_naming_it():
    message = lost_state_error("ObjectBuffer")
    assert "ObjectBuffer.reservoir (a _Reservoir) changed during the round but Context.state cannot hold it" in message
    assert "define state_dict()/load_state_dict()" in message


def test_a_torch_generator_attribute_is_stored_and_its_draws_continue_across_rounds():
    rounds = drive(small_scenario(continual={"method": f"{LOST}:GeneratorDraws"}), 0, SCHEDULE[:2])
    first, second = (stored_method_state(state) for _, _, state in rounds)
    assert isinstance(second["rng"], torch.Generator)
    n = len(first["draws"])
    assert n > 0 and len(second["draws"]) == 2 * n and second["draws"][:n] == first["draws"]
    rng = torch.Generator().manual_seed(7)
    assert second["draws"] == [float(torch.rand(1, generator=rng)) for _ in range(2 * n)]  # one stream, not two


def test_a_generator_left_out_of_its_own_state_dict_is_refused_naming_it():
    message = lost_state_error("GeneratorOutsideState")
    assert "would lose state: GeneratorOutsideState.rng changed during the round" in message


def test_scratch_a_round_recomputes_passes_only_when_declared_in_rebuilt_each_round():
    drive(small_scenario(continual={"method": f"{LOST}:DeclaredScratch"}), 0, SCHEDULE[:2])
    assert "UndeclaredScratch.last_labels changed during the round" in lost_state_error("UndeclaredScratch")


@pytest.mark.parametrize(
    ("name", "private"),
    [(name, False) for name in [*all_methods(), "l2_anchor"]]
    + [(name, True) for name in ("replay", "ewc", "lwf", "si", "l2_anchor")],
)
def test_built_in_and_stock_methods_keep_everything_their_rounds_change(name, private):
    """Training and consolidation rounds, each checked against a method rebuilt from what was stored."""
    scenario = small_scenario(
        continual={"method": name},
        stream={"n_experiences": 2},
        privacy={"enabled": private, "noise_multiplier": 1.0},
    )
    rounds = drive(scenario, 1, [(0, 1), (0, 2), (1, 3), (1, 4)])
    assert [int(r["client"]["consolidated"]) for _, r, _ in rounds] == [0, 0, 1, 0]


# --- hooks: a misspelt hook is refused before anything trains --------------------------------------


def test_misspelt_hooks_name_the_hook_meant_and_leave_helpers_and_avalanches_plugins_alone():
    from avalanche.training import plugins

    class Typos(SupervisedPlugin):
        def before_backwards(self, strategy, **kwargs): ...
        def after_trainig_exp(self, strategy, **kwargs): ...
        def aftertraining_exp(self, strategy, **kwargs): ...
        def after_training_exp(self, strategy, **kwargs): ...  # a real hook
        def update_memory(self, dataset): ...  # helpers
        def before_step_count(self) -> int: ...

    assert misspelt_hooks(Typos) == [
        ("after_trainig_exp", "after_training_exp"),
        ("aftertraining_exp", "after_training_exp"),
        ("before_backwards", "before_backward"),
    ]
    stock = [method.plugin_class for method in all_methods().values() if hasattr(method, "plugin_class")]
    avalanche = [getattr(plugins, n) for n in dir(plugins) if n.endswith("Plugin")]
    assert len(stock) == 5 and len(avalanche) > 20
    assert {cls.__name__: misspelt_hooks(cls) for cls in [*stock, *avalanche, L2Anchor] if misspelt_hooks(cls)} == {}


def test_validate_refuses_a_misspelt_hook_in_one_line_naming_the_hook_meant(run_cli):
    code, out, err = run_cli(
        "validate", "scenarios/quickstart.yaml", "--set", "continual.method=tests.broken_method:BackwardsHook"
    )
    assert code == 2 and len(err.strip().splitlines()) == 1
    message = " ".join(err.split())
    assert "continual.method: 'tests.broken_method:BackwardsHook' defines BackwardsHook.before_backwards" in message
    assert "which is not an Avalanche hook and would never be called (did you mean before_backward?)" in message
    assert "penalty" not in message

    # the same plugin brought by a user's ContinualMethod from its plugins()
    code, _, err = run_cli(
        "validate", "scenarios/quickstart.yaml", "--set", "continual.method=tests.broken_method:BringsBackwardsHook"
    )
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "defines BackwardsHook.before_backwards, which is not an Avalanche hook" in " ".join(err.split())


def test_check_plugin_fails_a_misspelt_hook_and_passes_correct_ones():
    report = check_plugin("tests.broken_method:BackwardsHook")
    assert [(c.name, c.ok) for c in report.checks] == [("loads", True), ("hook names", False)]
    assert "BackwardsHook.before_backwards" in report.message and "did you mean before_backward?" in report.message
    assert ("hook names", True) in [(c.name, c.ok) for c in check_plugin("si", {"si_lambda": 1.0}).checks]


# --- aggregation: the example strategy ---------------------------------------------------------


def _reply(arrays: ArrayRecord, n: int) -> Message:
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": n})})
    return Message(content, dst_node_id=0, message_type=MessageType.TRAIN)


def test_experience_momentum_resets_at_experience_boundaries(monkeypatch):
    # FedAvg's own node sampling needs a running grid; the momentum logic does not
    monkeypatch.setattr(FedAvg, "configure_train", lambda self, server_round, arrays, config, grid: [])
    for field in ("_run_id", "_node_id", "_task_id"):  # what a Message needs outside a running federation
        monkeypatch.setattr(TaskIdentity, field, 1)
    strategy = ExperienceMomentum(server_lr=1.0, momentum=0.5)
    zero = ArrayRecord([np.zeros(2, dtype=np.float32)])

    def round_(experience, server_round, arrays, update):
        strategy.configure_train(server_round, arrays, ConfigRecord({"experience": experience}), None)
        target = ArrayRecord([a + np.float32(update) for a in arrays.to_numpy_ndarrays()])
        new, _ = strategy.aggregate_train(server_round, [_reply(target, 5), _reply(target, 5)])
        return new

    first = round_(0, 1, zero, 1.0)  # v = 1
    second = round_(0, 2, first, 1.0)  # v = 0.5 * 1 + 1
    assert second.to_numpy_ndarrays()[0].tolist() == [2.5, 2.5]
    third = round_(1, 1, second, 1.0)  # new experience: v = 1 again
    assert third.to_numpy_ndarrays()[0].tolist() == [3.5, 3.5]
    assert strategy.resets == 2


# --- the contract checks ---------------------------------------------------------------------


def test_check_plugin_passes_on_the_example_method_and_names_what_it_checked():
    report = check_plugin("l2_anchor", {"strength": 0.5})
    assert report.ok, report.message
    assert report.kind == "continual method"
    names = [c.name for c in report.checks]
    assert names[0] == "loads" and "state kept across rounds" in names
    assert "round 2 (experience 1) consolidation counts" in names
    round_trip = next(c for c in report.checks if c.name == "state_dict() round-trip").detail
    assert "the same 6 arrays" in round_trip  # L2Anchor's anchor: one per MLP tensor
    assert report.checks[-1].name == "DP-SGD" and "trains and consolidates under DP-SGD" in report.checks[-1].detail


def test_check_plugin_passes_on_stock_si_whose_state_is_its_own_state_dict():
    report = check_plugin("si", {"si_lambda": 1.0})
    assert report.ok, report.message
    stored = next(c for c in report.checks if c.name == "state_dict() round-trip").detail
    assert "the same 24 arrays" in stored  # anchor, importance and two integrals for the MLP's 6 tensors
    assert report.checks[-1].name == "DP-SGD" and "trains and consolidates under DP-SGD" in report.checks[-1].detail


def test_check_plugin_fails_a_raising_method_naming_it_and_its_line_and_keeps_the_log(run_cli, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the check's folder goes
    code, out, err = run_cli("check-plugin", "tests.broken_method:BrokenMethod")
    message = " ".join(err.split())
    assert code == 1
    assert len(err.strip().splitlines()) == 1
    assert "continual method 'tests.broken_method:BrokenMethod' failed check 'round 1 (experience 0) trains'" in message
    at = f"broken_method.py:{_Explodes.before_training_exp.__code__.co_firstlineno + 1}, in before_training_exp"
    assert f"RuntimeError: broken_method exploded on purpose ({at}); full log: " in message  # as `fedtide run` says
    log = Path(message.rsplit("full log: ", 1)[1])
    assert log.parent.parent == tmp_path and "Traceback" in log.read_text()  # it exists once the command has ended


def test_check_plugin_refuses_a_false_dp_claim_with_the_runs_reason(run_cli):
    code, _, err = run_cli("check-plugin", "tests.dp_plugins:DarkReplay")
    message = " ".join(err.split())
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "continual method 'tests.dp_plugins:DarkReplay' failed check 'DP-SGD': continual method" in message
    assert "claims dp_compatible but, while DP-SGD trained, ran the model on inputs other than the DP batch" in message


def test_a_run_under_dp_stops_a_false_dp_claim_in_one_line(tmp_path, run_cli):
    small = ["stream.n_experiences=2", "federation.rounds_per_experience=1", "partition.num_clients=2"]
    dp = ["privacy.enabled=true", "privacy.noise_multiplier=1.0", "resources.backend=in_process"]
    overrides = [*small, *dp, "continual.method=tests.dp_plugins:DarkReplay"]
    args = [a for o in overrides for a in ("--set", o)]
    code, _, err = run_cli("run", "scenarios/quickstart.yaml", *args, "--output", str(tmp_path))
    message = " ".join(err.split())
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "failed in round 2" in message  # round 1 had nothing stored: DER added no term
    assert "continual method 'tests.dp_plugins:DarkReplay' claims dp_compatible but" in message
    assert "(dp_plugins.py:" in message and "in before_backward)" in message


def test_check_plugin_names_the_def_of_a_hook_with_a_wrong_signature_and_removes_a_passing_checks_folder(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    report = check_plugin("tests.broken_method:WrongHookSignature")
    at = f"broken_method.py:{_ForgetsStrategy.before_backward.__code__.co_firstlineno}, in before_backward"
    assert report.failure.name == "round 1 (experience 0) trains"
    assert f"_ForgetsStrategy.before_backward ({at}) cannot take the arguments" in report.message
    assert "learner.py" not in report.message
    kept = list(tmp_path.iterdir())
    assert len(kept) == 1 and (kept[0] / "errors.log").is_file()
    assert check_plugin("naive").ok
    assert list(tmp_path.iterdir()) == kept  # the passing check left nothing


def test_check_plugin_finds_plugin_state_that_cannot_live_in_the_context(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the failed check's folder is kept: not in /tmp
    report = check_plugin("avalanche.training.plugins:AGEMPlugin", {"patterns_per_experience": 8, "sample_size": 8})
    assert not report.ok
    assert report.failure.name == "round 2 (experience 1) keeps what it changed"  # the round that consolidated
    assert "AGEMPlugin.buffer_dataloader (a GroupBalancedInfiniteDataLoader)" in report.message
    assert "AGEMPlugin.buffers (a list) changed during the round but Context.state cannot hold it" in report.message


def test_check_plugin_fails_a_plugin_whose_training_changes_state_that_state_dict_leaves_out():
    report = check_plugin("tests.lost_state_plugins:ListBuffer")
    assert not report.ok
    assert report.failure.name == "round 1 (experience 0) keeps what it changed"  # a round without consolidation
    assert "ListBuffer.buffer changed during the round but is not restored from state_dict()" in report.message
    kept = check_plugin("tests.lost_state_plugins:GeneratorDraws")
    assert kept.ok, kept.message
    assert "state changed in rounds kept" in [c.name for c in kept.checks]


def test_check_plugin_reports_unloadable_plugins_and_unknown_parameters():
    missing = check_plugin("no_such_pkg.mod:Thing")
    assert not missing.ok and missing.failure.name == "loads" and "cannot import 'no_such_pkg.mod'" in missing.message
    unknown = check_plugin("l2_anchor", {"pull": 1})
    assert "continual.pull: L2Anchor takes no parameter 'pull'" in unknown.message
    assert unknown.message.startswith("continual method 'l2_anchor' failed check 'loads'")


def test_parse_scenario_keeps_plugin_parameters_beside_the_name():
    scenario = parse_scenario({"continual": {"method": "l2_anchor", "strength": 0.25}})
    assert method_class(scenario.continual.method).plugin_class is L2Anchor
    assert scenario.continual.params == {"strength": 0.25}


def test_array_check_names_missing_keys_wrong_shapes_and_non_finite_values():
    from fedtide.models import build_model
    from fedtide.server.array_check import array_problem

    model = build_model("mlp", (1, 8, 8), 10)
    good = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    reference = _record(good)
    assert array_problem(_record(good), reference) is None
    missing = dict(list(good.items())[:-1])
    expected = "keys differ from the model's: missing ['5.bias'], unexpected []"
    assert array_problem(_record(missing), reference) == expected
    wrong = good | {"5.bias": np.zeros(3, dtype=np.float32)}
    assert array_problem(_record(wrong), reference) == "'5.bias' has shape (3,), the model's is (10,)"
    inf = good | {"3.weight": np.full((128, 128), np.inf, dtype=np.float32)}
    assert array_problem(_record(inf), reference) == "'3.weight' holds non-finite values (NaN or inf)"


def _record(arrays: dict) -> ArrayRecord:

    return ArrayRecord({k: Array.from_numpy_ndarray(v) for k, v in arrays.items()})


def test_train_config_tells_strategies_and_clients_the_experience_and_its_rounds():
    scenario = parse_scenario({"stream": {"n_experiences": 4}, "federation": {"rounds_per_experience": 3}})
    config = train_config(scenario, 2)
    assert (config["experience"], config["n-experiences"], config["rounds-per-experience"]) == (2, 4, 3)
    assert config["round-offset"] == 6  # global round = 6 + server-round
    assert parse_scenario(json.loads(config["scenario"])) == scenario
