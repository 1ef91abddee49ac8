"""The plain-Flower reference for `experiment_cost.py`: the same training as a fedtide run, in ~20 lines of Flower.

A ClientApp that loads the global arrays into fedtide's MLP, trains `--epochs` epochs
on its shard of digits (every N-th training sample) and replies arrays and
`num-examples`; a ServerApp running Flower's FedAvg with the global test accuracy after
each round; `run_simulation` on Ray with one CPU per client.

    python benchmarks/plain_flower.py --clients 10 --rounds 15 --epochs 2
"""

from __future__ import annotations

import argparse

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

from fedtide.data.datasets import load_dataset
from fedtide.models import build_model

ARGS = argparse.Namespace(clients=10, rounds=15, epochs=2, batch_size=32, lr=0.05)
client_app, server_app = ClientApp(), ServerApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    data, shard = load_dataset("digits"), int(context.node_config["partition-id"])
    x, y = data.train_x[shard :: ARGS.clients], data.train_y[shard :: ARGS.clients]
    model = build_model("mlp", (1, 8, 8), 10)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=ARGS.lr)
    for _ in range(ARGS.epochs):
        for batch in torch.randperm(len(y)).split(ARGS.batch_size):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    reply = {"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord({"num-examples": len(y)})}
    return Message(RecordDict(reply), reply_to=msg)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    data, model = load_dataset("digits"), build_model("mlp", (1, 8, 8), 10, seed=0)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        with torch.no_grad():
            return MetricRecord({"accuracy": float((model(data.test_x).argmax(1) == data.test_y).float().mean())})

    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0)
    strategy.start(grid, ArrayRecord(model.state_dict()), num_rounds=ARGS.rounds, evaluate_fn=evaluate)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("clients", "rounds", "epochs"):
        parser.add_argument(f"--{name}", type=int, default=getattr(ARGS, name))
    parser.parse_args(namespace=ARGS)
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"address": "local"}}
    run_simulation(server_app, client_app, num_supernodes=ARGS.clients, backend_config=backend)
