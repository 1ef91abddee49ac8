"""DP-SGD on clients: cumulative ε that Opacus's accountant reproduces, budgets, penalties kept."""

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from torch.utils.data import TensorDataset

from fedtide.client.schedule import train_schedule
from fedtide.client.training import MethodFailed
from fedtide.continual.base import ContinualMethod
from fedtide.continual.methods import build_method
from fedtide.data.stream_plan import stream_plan
from fedtide.errors import ScenarioError, raised_at
from fedtide.models import build_model
from fedtide.privacy.accounting import check_privacy, client_delta, noise_multiplier
from fedtide.privacy.dp_guards import DPBatchOnly, UnaccountedData
from fedtide.privacy.dp_sgd import ClientPrivacy
from fedtide.privacy.opacus_model import opacus_ready
from fedtide.records.run_folder import create_run_folder, read_rounds
from fedtide.runner.simulation import simulate_in_process
from fedtide.scenario.schema import PrivacyConfig
from tests.conftest import flat, initial_arrays, small_scenario, stored_method_state

SCHEDULE = [(0, 1), (0, 2), (1, 3), (1, 4), (2, 5)]
MODES = ["hooks", "functorch", "ghost"]


def private_scenario(method="naive", method_params=None, **privacy):
    return small_scenario(
        partition={"kind": "iid", "num_clients": 2},
        continual={"method": method, **(method_params or {})},
        privacy={"enabled": True, "max_grad_norm": 1.0, **(privacy or {"noise_multiplier": 1.0})},
    )


def run_private(scenario, schedule=SCHEDULE, mu=0.0, partition_id=0):
    """Train through the schedule; return final arrays and each round's reply."""
    rounds = train_schedule(scenario, partition_id, schedule, initial_arrays(scenario), proximal_mu=mu)
    return rounds[-1].reply["arrays"], [r.reply for r in rounds]


def history(reply) -> list[tuple[float, float, int]]:
    record = reply["privacy"]
    return list(zip(record["sigmas"], record["rates"], record["steps"]))


def test_epsilon_is_cumulative_and_recomputed_by_opacus():
    scenario = private_scenario()
    _, replies = run_private(scenario)
    reported = [reply["client"]["epsilon"] for reply in replies]
    assert all(b > a for a, b in zip(reported, reported[1:])), reported
    for reply, epsilon in zip(replies, reported):
        accountant = RDPAccountant()
        accountant.history = history(reply)
        assert accountant.get_epsilon(delta=client_delta(scenario)) == pytest.approx(epsilon, rel=1e-9)
    # the steps on record are every Poisson step of every round, counted from the data sizes
    sizes = stream_plan(scenario).client(0).sizes
    expected_steps = sum(math.ceil(sizes[e] / scenario.client.batch_size) for e, _ in SCHEDULE)
    assert sum(steps for _, _, steps in history(replies[-1])) == expected_steps
    expected_rates = {1 / math.ceil(sizes[e] / scenario.client.batch_size) for e, _ in SCHEDULE}
    assert sorted({rate for _, rate, _ in history(replies[-1])}) == pytest.approx(sorted(expected_rates))


def test_ewc_and_fedprox_penalties_survive_the_dp_optimizer():
    naive, _ = run_private(private_scenario("naive"))
    ewc, ewc_replies = run_private(private_scenario("ewc", noise_multiplier=1.0))
    assert not np.allclose(flat(naive), flat(ewc))
    start = flat(initial_arrays(private_scenario()))
    plain, _ = run_private(private_scenario(), schedule=[(0, 1)])
    proximal, _ = run_private(private_scenario(), schedule=[(0, 1)], mu=5.0)
    assert not np.allclose(flat(plain), flat(proximal))
    # same noise draws (same seed): the proximal term pulls the update towards the global model
    assert np.linalg.norm(flat(proximal) - start) < np.linalg.norm(flat(plain) - start)


def test_si_under_dp_spends_nothing_more_and_its_penalty_survives():
    """SI's integral reads only weights and the privatised p.grad after each DP step: post-processing."""
    naive, naive_replies = run_private(private_scenario("naive"), schedule=SCHEDULE[:4])
    si_scenario = private_scenario("si", {"si_lambda": 1000.0}, noise_multiplier=1.0)
    rounds = train_schedule(si_scenario, 0, SCHEDULE[:4], initial_arrays(si_scenario))
    replies, arrays, state = [r.reply for r in rounds], rounds[-1].reply["arrays"], rounds[-1].state
    assert [int(r["client"]["consolidated"]) for r in replies] == [0, 0, 1, 0]
    assert history(replies[-1]) == history(naive_replies[-1])  # the same DP steps, nothing else charged
    assert replies[-1]["client"]["epsilon"] == naive_replies[-1]["client"]["epsilon"]
    importance = stored_method_state(state, si_scenario)["importance"].values()
    assert sum(int((i > 0).sum()) for i in importance) > 100  # learned from the noised path
    assert not np.allclose(flat(naive), flat(arrays))  # same noise draws: only the penalty differs


@pytest.mark.parametrize(
    ("plugin", "hook"),
    [("DarkReplay", "before_backward"), ("StoredGradient", "after_backward"), ("StoredTargets", "before_backward")],
)
def test_a_false_dp_claim_is_refused_at_the_first_step_that_computes_on_other_data(plugin, hook):
    """DER's loss on stored inputs, a reference gradient on them, or their outputs as targets: none is
    clipped, noised or charged, so a method that claims dp_compatible and does one is stopped."""
    scenario = private_scenario(f"tests.dp_plugins:{plugin}")
    (first,) = train_schedule(scenario, 0, [(0, 1)], initial_arrays(scenario))  # nothing stored yet: it trains
    with pytest.raises(UnaccountedData) as refused:
        train_schedule(scenario, 0, [(1, 2)], first.reply["arrays"], state=first.state)
    message = str(refused.value)
    assert message.startswith(f"continual method 'tests.dp_plugins:{plugin}' claims dp_compatible but, while DP-SGD")
    assert "ran the model on inputs other than the DP batch" in message and "set dp_compatible = False" in message
    assert raised_at(refused.value).startswith("dp_plugins.py:") and raised_at(refused.value).endswith(hook)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_a_gradient_written_into_p_grad_after_backward_is_refused(mode):
    """A reference gradient computed when consolidating needs no forward while training, but is
    no gradient of the loss: neither the remainder (hooks) nor ghost clipping's sum may carry it."""
    scenario = private_scenario("tests.dp_plugins:ReferenceGradient", noise_multiplier=1.0, grad_sample_mode=mode)
    with pytest.raises(UnaccountedData, match="ReferenceGradient' claims dp_compatible but, .* changed p.grad after"):
        train_schedule(scenario, 0, [(0, 1), (1, 2)], initial_arrays(scenario))


def test_per_sample_terms_and_parameter_only_penalties_keep_their_dp_route():
    """LwF's teacher (another module, on the DP batch), a second forward on the DP batch itself and a
    user's parameter-only penalty pass the DP-batch rule, and each still changes the training."""
    schedule = [(0, 1), (1, 2)]
    naive, naive_replies = run_private(private_scenario("naive"), schedule)
    for method in ("lwf", "l2_anchor", "tests.dp_plugins:BatchConsistency"):
        arrays, replies = run_private(private_scenario(method), schedule)
        assert replies[-1]["client"]["epsilon"] == naive_replies[-1]["client"]["epsilon"] > 0
        assert int(replies[-1]["client"]["consolidated"]) == 1
        if method != "tests.dp_plugins:BatchConsistency":  # its pull towards its own outputs is 0
            assert not np.allclose(flat(naive), flat(arrays)), method


def test_dp_batch_rule_covers_the_model_its_modules_and_ends_with_the_round():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    batch, other = torch.randn(5, 4), torch.randn(5, 4)
    strategy = SimpleNamespace(model=model, mbatch=None)
    guard = DPBatchOnly(strategy, "mine")
    with pytest.raises(UnaccountedData, match="ran the model on inputs other than the DP batch"):
        model(batch)  # before any DP batch is drawn
    strategy.mbatch = [batch, torch.zeros(5)]
    model(batch)
    with torch.no_grad():
        model(batch)
    for outside in (lambda: model(other), lambda: model(batch.clone())):
        with pytest.raises(UnaccountedData, match="continual method 'mine' claims dp_compatible"):
            outside()
    with torch.no_grad(), pytest.raises(UnaccountedData):
        model(other)
    with pytest.raises(UnaccountedData, match="ran the model's Linear on its own"):
        model[0](other)
    model(batch)  # a refusal left no forward half-entered
    wrong = torch.randn(5, 7)  # a DP batch the model cannot take: its forward raises
    strategy.mbatch = [wrong, torch.zeros(5)]
    with pytest.raises(RuntimeError, match="shapes"):
        model(wrong)
    with pytest.raises(UnaccountedData):  # the raising forward did not leave the rule off
        model(other)
    strategy.mbatch = [batch, torch.zeros(5)]
    teacher = copy.deepcopy(model)  # a copy made mid-round shares the rule (and copies no learner)
    teacher(batch)
    with pytest.raises(UnaccountedData):
        teacher(other)
    guard.remove()
    for module in (model, teacher):
        module(other)
        module[2](torch.randn(1, 3))


def test_ewc_fisher_pass_under_dp_is_charged_to_the_accountant():
    _, naive = run_private(private_scenario("naive"), schedule=SCHEDULE[:3])
    _, ewc = run_private(private_scenario("ewc", noise_multiplier=1.0), schedule=SCHEDULE[:3])
    naive_steps = sum(s for *_, s in history(naive[-1]))
    ewc_steps = sum(s for *_, s in history(ewc[-1]))
    experience_0 = stream_plan(private_scenario()).client(0).sizes[0]
    assert ewc_steps - naive_steps == math.ceil(experience_0 / 32)  # one Poisson pass over experience 0
    assert ewc[-1]["client"]["epsilon"] > naive[-1]["client"]["epsilon"]


def test_replay_buffer_is_inside_the_poisson_sampled_dataset():
    scenario = small_scenario(
        partition={"kind": "iid", "num_clients": 2},
        continual={"method": "replay", "mem_size": 40},
        privacy={"enabled": True, "noise_multiplier": 1.0},
    )
    _, replies = run_private(scenario, schedule=[(0, 1), (1, 3)])
    size_1 = stream_plan(scenario).client(0).sizes[1]
    rate_with_buffer = 1 / math.ceil((size_1 + 40) / 32)
    assert history(replies[-1])[-1][1] == pytest.approx(rate_with_buffer)


def test_budget_stops_a_client_before_it_exceeds_the_target():
    scenario = private_scenario(noise_multiplier=1.0, target_epsilon=3.0)
    _, replies = run_private(scenario)
    epsilons = [reply["client"]["epsilon"] for reply in replies]
    stopped = [reply["client"]["budget_exhausted"] for reply in replies]
    assert max(epsilons) <= 3.0
    assert stopped[0] is False and stopped[-1] is True
    assert replies[-1]["metrics"]["num-examples"] == 0


def test_target_epsilon_calibrates_noise_to_spend_about_the_target():
    scenario = small_scenario(
        partition={"kind": "iid", "num_clients": 2},
        federation={"rounds_per_experience": 1},
        privacy={"enabled": True, "target_epsilon": 2.0},
    )
    _, replies = run_private(scenario, schedule=[(0, 1), (1, 2), (2, 3)])
    final = replies[-1]["client"]["epsilon"]
    assert 1.9 <= final <= 2.0
    footprint = build_method(scenario.continual).private_footprint()
    assert replies[-1]["client"]["noise_multiplier"] == noise_multiplier(scenario, 0, footprint) > 0.5


def test_opacus_validator_fixes_batchnorm_and_keeps_builtin_models():
    model = build_model("cnn", (1, 8, 8), 10)
    assert opacus_ready(model) is model
    with_batchnorm = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten())
    fixed = opacus_ready(with_batchnorm)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fixed.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in fixed.modules())


def clipped_mean_by_hand(model, x, y, max_grad_norm: float) -> tuple[list[torch.Tensor], list[float]]:
    """DP-SGD's gradient without noise, one sample at a time: each sample's gradient scaled to
    norm <= max_grad_norm as Opacus scales it, summed, over the batch size; and the scale factors."""
    total = [torch.zeros_like(p) for p in model.parameters()]
    factors = []
    for sample, label in zip(x, y):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(sample[None]), label[None]).backward()
        norm = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters()))
        factors.append(min(1.0, max_grad_norm / (float(norm) + 1e-6)))
        for summed, p in zip(total, model.parameters()):
            summed += factors[-1] * p.grad
    return [summed / len(x) for summed in total], factors


@pytest.mark.parametrize("mode", MODES)
def test_each_grad_sample_mode_clips_every_sample_and_is_accounted_alike(mode):
    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    model = build_model("mlp", (1, 8, 8), 10, seed=0)
    expected, factors = clipped_mean_by_hand(copy.deepcopy(model), x[:16], y[:16], max_grad_norm=3.0)
    assert min(factors) < 1.0 == max(factors)  # some samples clipped, some not
    privacy = ClientPrivacy(PrivacyConfig(enabled=True, max_grad_norm=3.0, grad_sample_mode=mode), 0.0, [])
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    dp_optimizer, _, dp_criterion = privacy.make_private(model, optimizer, TensorDataset(x, y), 16, criterion)
    dp_optimizer.zero_grad()
    (dp_criterion or criterion)(model(x[:16]), y[:16]).backward()
    dp_optimizer.pre_step()  # noise 0: p.grad is the clipped mean over the expected batch of 16
    for param, want in zip(model.parameters(), expected):
        torch.testing.assert_close(param.grad, want, rtol=1e-4, atol=1e-6)
    assert privacy.history == [(0.0, 16 / 64, 1)]
    # the mode was used: ghost forms no per-sample gradient, functorch forms them through torch.func
    assert all((p.grad_sample is None) == (mode == "ghost") for p in model.parameters())
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(hasattr(layer, "ft_compute_sample_grad") == (mode == "functorch") for layer in linear)


def test_grad_sample_modes_spend_the_same_epsilon_and_train_alike():
    start = initial_arrays(private_scenario())
    runs = {}
    for mode in MODES:
        rounds = train_schedule(private_scenario(noise_multiplier=1.0, grad_sample_mode=mode), 0, SCHEDULE[:3], start)
        runs[mode] = (flat(rounds[-1].reply["arrays"]), [r.reply for r in rounds])
    hooks_weights, hooks_replies = runs["hooks"]
    for weights, replies in runs.values():
        assert [history(r) for r in replies] == [history(r) for r in hooks_replies]
        assert [r["client"]["epsilon"] for r in replies] == [r["client"]["epsilon"] for r in hooks_replies]
        np.testing.assert_allclose(weights, hooks_weights, rtol=0, atol=1e-6)  # float rounding only


class LossTerm(ContinualMethod):
    """A user's method that says nothing of its loss: it may add a term to it."""

    name = "loss_term"
    dp_compatible = True

    def plugins(self) -> list:
        return []

    def consolidate(self, learner) -> None:
        """Nothing to remember."""


class NoLossTerm(LossTerm):
    """The same, saying that it adds nothing to the loss."""

    adds_loss_term = False


def test_ghost_clipping_is_refused_where_a_term_joins_the_loss():
    """By the method's `adds_loss_term`, not its name: a user's method that says it adds none passes too."""

    def check(scenario) -> None:
        check_privacy(scenario, build_method(scenario.continual))

    for method in ("naive", "replay", "tests.test_privacy:NoLossTerm"):
        check(private_scenario(method, noise_multiplier=1.0, grad_sample_mode="ghost"))
    for method in ("ewc", "lwf", "si", "tests.test_privacy:LossTerm"):
        with pytest.raises(ScenarioError, match=f"grad_sample_mode: .*method '{method}'"):
            check(private_scenario(method, noise_multiplier=1.0, grad_sample_mode="ghost"))
    fedprox = small_scenario(
        federation={"strategy": {"name": "fedprox", "proximal_mu": 0.1}},
        continual={"method": "naive"},
        privacy={"enabled": True, "noise_multiplier": 1.0, "grad_sample_mode": "ghost"},
    )
    with pytest.raises(ScenarioError, match="FedProx adds its proximal term"):
        check(fedprox)
    # a term the scenario does not show (here a proximal mu a strategy sends) stops the round
    with pytest.raises(MethodFailed, match="a plugin added a term to the loss"):
        run_private(private_scenario(noise_multiplier=1.0, grad_sample_mode="ghost"), schedule=[(0, 1)], mu=5.0)
    with pytest.raises(ScenarioError, match="expanded weights"):
        private_scenario(grad_sample_mode="ew")


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_empty_poisson_batches_are_noise_only_steps_not_a_diverged_client(tmp_path, mode):
    """An expected batch of 2 draws empty Poisson batches (about e^-2 of the steps): their mean
    loss must not turn the round's loss into NaN and stop the client as diverged."""
    scenario = small_scenario(
        name=mode,
        stream={"n_experiences": 1},
        partition={"kind": "iid", "num_clients": 2},
        federation={"rounds_per_experience": 1},
        client={"batch_size": 2, "epochs": 1},
        continual={"method": "naive"},
        privacy={"enabled": True, "noise_multiplier": 1.0, "grad_sample_mode": mode},
    )
    folder = create_run_folder(scenario, tmp_path)
    summary = simulate_in_process(scenario, folder)
    assert summary.clients_failed == 0 and summary.privacy.epsilon_max > 0
    (only_round,) = read_rounds(folder)
    assert all(math.isfinite(client.train_loss) and client.num_examples > 0 for client in only_round.per_client)
