"""Bad scenarios give one readable line naming the field, exit code 2, and no traceback."""

from pathlib import Path

import pytest
import torch
import yaml

from fedtide.runner.validation import check_resources
from fedtide.scenario.loading import load_scenario
from tests.conftest import small_scenario
from tests.conftest import write_scenario_file as write


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ({"partition": {"kind": "iid", "num_clientz": 3}}, "partition.num_clientz: unknown key"),
        ({"federation": {"rounds_per_experience": "many"}}, "federation.rounds_per_experience"),
        ({"partition": {"kind": "dirichlet", "alpha": 0}}, "partition.alpha: Input should be greater than 0"),
        ({"stream": {"n_experiences": 11}}, "exceeds the 10 classes of digits"),
        ({"federation": {"strategy": {"name": "fedfoo"}}}, "unknown strategy 'fedfoo'"),
        ({"continual": {"method": "gem2"}}, "unknown method 'gem2'"),
        ({"continual": {"method": "ewc", "mem_size": 10}}, "continual.mem_size: EWC takes no parameter"),
        ({"federation": {"strategy": {"name": "fedprox", "mu": 1}}}, "FedProx takes no parameter 'mu'"),
        ({"federation": {"strategy": {"name": "no_such_pkg.mod:Cls"}}}, "cannot import 'no_such_pkg.mod'"),
        ({"stream": {"class_order": [0, 1, 2]}}, "class_order must list each of the 10 classes"),
        ("name: [unclosed", "is not valid YAML at line 1"),
        ({"dataset": {"name": "imagenet"}}, "dataset.name"),
        ({"privacy": {"enabled": True, "noise_multiplier": -1}}, "privacy.noise_multiplier: Input should be greater"),
        ({"privacy": {"enabled": True, "max_grad_norm": 0}}, "privacy.max_grad_norm: Input should be greater than 0"),
        ({"privacy": {"enabled": True, "delta": 0.01}}, "privacy.delta: 0.01 is not below 1/n"),
        ({"privacy": {"enabled": True, "target_epsilon": 0.0001}}, "privacy.target_epsilon: 0.0001 cannot be reached"),
    ],
)
def test_invalid_scenario_is_one_line_and_exit_2(tmp_path, run_cli, content, expected):
    code, out, err = run_cli("validate", str(write(tmp_path, content)))
    assert code == 2
    assert expected in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in out + err


def test_missing_dataset_names_where_it_looked(tmp_path, run_cli):
    empty = tmp_path / "data"
    empty.mkdir()
    code, _, err = run_cli("validate", str(write(tmp_path, {"dataset": {"name": "mnist", "root": str(empty)}})))
    assert code == 2
    assert f"MNIST not found or unreadable under '{empty}'" in " ".join(err.split())


def test_missing_file_and_bad_override(tmp_path, run_cli):
    code, _, err = run_cli("validate", str(tmp_path / "nope.yaml"))
    assert (code, "no such scenario file" in err) == (2, True)
    code, _, err = run_cli("validate", str(write(tmp_path, {})), "--set", "seed")
    assert (code, "is not field.path=value" in err) == (2, True)


def test_run_with_invalid_scenario_writes_nothing(tmp_path, run_cli):
    out_dir = tmp_path / "runs"
    code, _, _ = run_cli("run", str(write(tmp_path, {"continual": {"method": "nope"}})), "--output", str(out_dir))
    assert code == 2
    assert not out_dir.exists()


def test_overrides_apply_and_switching_method_drops_old_parameters(tmp_path):
    path = write(tmp_path, {"continual": {"method": "replay", "mem_size": 50}, "partition": {"alpha": 0.5}})
    scenario = load_scenario(
        path,
        [
            "continual.method=ewc",
            "continual.ewc_lambda=3.5",
            "partition.alpha=0.1",
            "federation.strategy.name=fedprox",
            "federation.strategy.proximal_mu=0.01",
        ],
    )
    assert scenario.continual.method == "ewc"
    assert scenario.continual.params == {"ewc_lambda": 3.5}
    assert scenario.partition.alpha == 0.1
    assert scenario.federation.strategy.params == {"proximal_mu": 0.01}


SHIPPED = [
    # privacy_levels calibrates σ for each of its 32 points
    pytest.param(path, id=path.stem, marks=[pytest.mark.slow] if path.stem == "privacy_levels" else [])
    for path in sorted((Path(__file__).parent.parent / "scenarios").glob("*.yaml"))
]


@pytest.mark.parametrize("path", SHIPPED)
def test_validate_accepts_shipped_scenarios(run_cli, fashion_mnist_root, path):
    """Fashion-MNIST scenarios validate against generated idx files, so no machine needs the real ones."""
    overrides = []
    if yaml.safe_load(path.read_text()).get("dataset", {}).get("name") == "fashion_mnist":
        overrides = ["--set", f"dataset.root={fashion_mnist_root}"]
    code, out, err = run_cli("validate", str(path), *overrides)
    assert code == 0, err
    assert "ok" in out


def test_list_shows_every_registry(run_cli):
    code, out, _ = run_cli("list")
    assert code == 0
    for name in ("fedavg", "fedprox", "krum", "replay", "ewc", "lwf", "digits", "fashion_mnist", "dirichlet", "cnn"):
        assert name in out


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["resources.num_cpus_per_client=4096"], "resources.num_cpus_per_client: 4096 CPUs per client, but this mach"),
        (["resources.num_gpus_per_client=0.25"], "resources.num_gpus_per_client: 0.25 GPU per client, but this mach"),
        (["resources.device=cuda"], "resources.device: cuda, but num_gpus_per_client is 0"),
        (
            ["resources.backend=in_process", "resources.ray_address=auto"],
            "resources.backend: in_process runs every client in this process, so it cannot use the Ray cluster",
        ),
    ],
)
def test_resources_a_local_ray_cannot_grant_are_one_line_before_anything_starts(
    tmp_path, run_cli, monkeypatch, overrides, expected
):
    """Flower's Ray backend would start no client actor and the run would wait for ever."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # as on CI: the GPU case reads the same anywhere
    args = [a for o in overrides for a in ("--set", o)]
    code, out, err = run_cli("run", "scenarios/quickstart.yaml", *args, "--output", str(tmp_path))
    assert code == 2
    assert expected in " ".join(err.split()) and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())  # no run folder was made
    # on a cluster they are the cluster's to grant
    check_resources(small_scenario(resources={"num_cpus_per_client": 4096, "ray_address": "auto"}))


def test_a_scenario_without_a_client_section_trains_as_the_quickstart_and_adam_gets_its_own_lr():
    """The client defaults are the quickstart's local training (docs/results.md, "Client defaults");
    an lr left unset follows the optimizer, so Adam does not inherit SGD's step size."""
    from fedtide.scenario.schema import ClientConfig

    quickstart = load_scenario(Path(__file__).resolve().parents[1] / "scenarios" / "quickstart.yaml", [])
    assert ClientConfig() == quickstart.client
    assert ClientConfig.model_validate({"optimizer": "adam"}).lr == 3e-3
    assert ClientConfig.model_validate({"optimizer": "adam", "lr": 0.5}).lr == 0.5
    assert ClientConfig.model_validate({"optimizer": "sgd", "epochs": 1}).lr == 0.1
