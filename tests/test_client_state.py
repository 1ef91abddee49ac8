"""One state convention and its edge cases: the codec, clients with empty experiences, divergence, the protocol.

Clients run in-process through `run_training_round` (the ClientApp's own function),
their `Context.state` deep-copied between calls as Ray does.
"""

import subprocess
import sys

import numpy as np
import pytest
import torch
from avalanche.training.utils import ParamData
from flwr.app import ArrayRecord, RecordDict

from fedtide.client.schedule import train_schedule
from fedtide.client.state import ClientState, ConsolidationProgress
from fedtide.client.training import RoundTask, run_training_round
from fedtide.continual.builtin import EWC
from fedtide.continual.methods import all_methods
from fedtide.continual.state_codec import UnstorableState, decode, encode
from fedtide.data.stream import training_pool
from fedtide.data.stream_plan import stream_plan
from fedtide.models import build_scenario_model
from fedtide.records.wire import client_round
from tests.conftest import small_scenario

# The run: Dirichlet(0.05) over 20 clients, 3 experiences, seed 1. Client 6 holds
# no data in experience 0 (sizes 0, 5, 2); client 16 holds one sample in it (1, 118, 9).
SCHEDULE = [(e, 2 * e + k + 1) for e in range(3) for k in range(2)]


def sparse(method: dict):
    return small_scenario(
        name="sparse",
        seed=1,
        partition={"kind": "dirichlet", "alpha": 0.05, "num_clients": 20},
        client={"epochs": 2, "batch_size": 32, "lr": 0.1},
        continual=method,
    )


def model_of(scenario):
    return build_scenario_model(scenario, seed=scenario.seed)


def drive(scenario, partition_id, schedule=SCHEDULE):
    """Train one client through `schedule` on its own chain of weights; return replies and the last state."""
    rounds = train_schedule(scenario, partition_id, schedule, ArrayRecord(model_of(scenario).state_dict()))
    return [r.reply for r in rounds], rounds[-1].state


def test_codec_round_trips_nested_tensors_params_modules_and_plain_values():
    model = torch.nn.Linear(3, 2)
    state = {
        "tables": {0: {"w": ParamData("w", init_tensor=torch.arange(6.0).reshape(2, 3))}, 2: {}},
        "ids": [np.arange(4), np.arange(2)],
        "teacher": model,
        "count": 3,
        "classes": [1, 2],
        "weights": torch.tensor([0.5, 0.25]),
    }
    arrays, layout = encode(state)
    back = decode(arrays, layout, torch.nn.Linear(3, 2))
    assert set(back["tables"]) == {0, 2} and back["tables"][2] == {}
    assert isinstance(back["tables"][0]["w"], ParamData) and back["tables"][0]["w"].name == "w"
    assert torch.equal(back["tables"][0]["w"].data, torch.arange(6.0).reshape(2, 3))
    assert [a.tolist() for a in back["ids"]] == [[0, 1, 2, 3], [0, 1]]
    assert torch.equal(back["teacher"].weight, model.weight) and not back["teacher"].weight.requires_grad
    assert (back["count"], back["classes"]) == (3, [1, 2])
    assert torch.equal(back["weights"], torch.tensor([0.5, 0.25]))


def test_codec_stores_a_torch_generator_as_its_state_so_its_draws_go_on():
    rng = torch.Generator().manual_seed(3)
    torch.rand(5, generator=rng)
    arrays, layout = encode({"rng": rng})
    back = decode(arrays, layout, torch.nn.Linear(3, 2))["rng"]
    assert isinstance(back, torch.Generator) and back is not rng
    assert torch.equal(torch.rand(4, generator=back), torch.rand(4, generator=rng))


def test_codec_names_the_entry_it_cannot_store():
    with pytest.raises(UnstorableState, match=r"state\['loader'\] is a generator"):
        encode({"loader": (i for i in range(3))})


@pytest.mark.parametrize("name", [n for n in all_methods() if n not in ("gem",)] + ["gem"])
def test_every_method_runs_a_client_with_no_data_in_the_first_experience(name):
    """The crash of the issue: EWC listed an empty anchor for experience 0 and failed to load it."""
    if name == "gem":
        pytest.importorskip("quadprog")
    scenario = sparse({"method": name})
    assert stream_plan(scenario).client(6).sizes == [0, 5, 2]
    replies, state = drive(scenario, 6)
    report = client_round(replies[-1])
    assert report.consolidation_counts == [0, 1, 0]  # experience 0 held nothing; 1 consolidated once
    assert report.num_examples == 2 and np.isfinite(report.train_loss)
    method = all_methods()[name]()
    method.bind(model_of(scenario), training_pool(scenario))
    ClientState(state, 3).restore_method(method, model_of(scenario))  # the stored state loads back


def test_ewc_keeps_only_the_experiences_it_consolidated():
    _, state = drive(sparse({"method": "ewc"}), 6)
    arrays, layout = state["fedtide.method.arrays"], state["fedtide.method.layout"]
    stored = decode(arrays, layout, model_of(sparse({"method": "ewc"})))
    assert set(stored["anchor"]) == set(stored["importance"]) == {1}


def test_ewc_caps_importances_at_the_stiffness_sgd_can_follow():
    """An importance far above 1/(2·λ·lr) made SGD overshoot the anchor further at every step."""
    scenario = sparse({"method": "ewc", "ewc_lambda": 10.0})
    model = model_of(scenario)
    huge = {n: ParamData(n, init_tensor=torch.full_like(p, 50.0)) for n, p in model.named_parameters()}
    anchor = {n: ParamData(n, init_tensor=p.detach().clone() + 0.01) for n, p in model.named_parameters()}
    ewc = EWC(ewc_lambda=10.0)
    state = RecordDict()
    ewc.plugin.saved_params[0], ewc.plugin.importances[0] = anchor, huge
    ClientState(state, 3).store_method(ewc)
    ClientState(state, 3).progress = ConsolidationProgress(
        done_through=1, counts=[1, 0, 0]
    )  # experience 0 consolidated
    reply = run_training_round(RoundTask(scenario, 16, 1, 3), ArrayRecord(model.state_dict()), state)
    report = client_round(reply)
    assert np.isfinite(report.train_loss) and report.train_loss < 20
    cap = 1 / (2 * 10.0 * 0.1)
    assert report.num_examples == 118
    # uncapped, each step would multiply the distance to the anchor by 1 - 2·lr·λ·50 = -99
    for name, array in reply["arrays"].items():
        assert np.abs(array.numpy() - anchor[name].data.numpy()).max() < 10 * cap, name


def test_a_diverging_client_is_named_with_its_round_loss_and_what_to_lower():
    scenario = sparse({"method": "tests.broken_method:NaNLoss"})
    with pytest.raises(RuntimeError, match=r"client 16 diverged in round 3: train loss nan.*lower client.lr, now 0.1"):
        drive(scenario, 16, [(1, 3)])


def test_bookkeeping_travels_in_a_config_record_and_metrics_hold_only_averageable_values():
    replies, _ = drive(sparse({"method": "replay", "mem_size": 20}), 16, SCHEDULE[:3])
    content = replies[-1]
    assert set(content["metrics"]) == {"num-examples", "train_loss"}  # ε is no metric: strategies would average it
    assert int(content["client"]["partition_id"]) == 16 and content["client"]["epsilon"] == 0.0
    assert list(content["client"]["consolidation_counts"]) == [1, 0, 0]


def test_a_late_client_consolidates_at_the_weights_that_ended_the_experience():
    """With fraction_train < 1 a client first sampled mid-experience-1 must not anchor at experience 1's weights."""
    scenario = sparse({"method": "ewc"})
    ended = ArrayRecord(model_of(scenario).state_dict())
    later = ArrayRecord({k: torch.from_numpy(v.numpy() + 0.05) for k, v in ended.items()})

    def anchor_after(task: RoundTask) -> dict:
        state = RecordDict()
        reply = run_training_round(task, later, state)
        assert list(reply["client"]["consolidation_counts"]) == [1, 0, 0]
        stored = decode(state["fedtide.method.arrays"], state["fedtide.method.layout"], model_of(scenario))
        return {name: param.data.numpy() for name, param in stored["anchor"][0].items()}

    told = anchor_after(RoundTask(scenario, 19, 1, 4, experience_ends={0: ended}))
    untold = anchor_after(RoundTask(scenario, 19, 1, 4))
    for name, value in told.items():
        assert np.array_equal(value, ended[name].numpy())  # the weights that ended experience 0
        assert np.array_equal(untold[name], later[name].numpy())  # without them: this round's weights


def test_privacy_is_the_lower_layer_it_never_imports_continual_methods():
    code = (
        "import sys; import fedtide.privacy.accounting, fedtide.privacy.dp_sgd, fedtide.privacy.budget; "
        "print(sorted(m for m in sys.modules if m.startswith(('fedtide.continual', 'fedtide.client'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
