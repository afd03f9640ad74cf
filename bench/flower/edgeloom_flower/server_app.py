"""The Flower arm's ServerApp: flat FedAvg (weighted by examples) over every node, each
round, evaluated centrally on the shared test rows; writes accuracy and the time of every
round as JSON to `results`."""

import json
import os
import time

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from edgeloom_flower.task import Mlp, accuracy, load_csv, load_safetensors

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    torch.set_num_threads(1)
    cfg = context.run_config
    nodes = int(cfg["nodes"])
    model = Mlp()
    load_safetensors(model, str(cfg["init-model"]))
    tx, ty = load_csv(os.path.join(str(cfg["data-dir"]), "test.csv"))
    times, accs = [], []

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        times.append(time.time())
        m = Mlp()
        m.load_state_dict(arrays.to_torch_state_dict())
        a = accuracy(m, tx, ty)
        if server_round > 0:
            accs.append(a)
        return MetricRecord({"accuracy": a})

    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=nodes,
        min_available_nodes=nodes,
    )
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=int(cfg["num-server-rounds"]),
        evaluate_fn=evaluate,
    )
    per_round = [b - a for a, b in zip(times, times[1:])]
    with open(str(cfg["results"]), "w") as f:
        json.dump({"accuracy": accs, "secondsPerRound": per_round}, f)
