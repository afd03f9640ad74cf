"""The Flower arm's ClientApp: trains on its node's CSV (partition-id) from the round's model."""

import os

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from edgeloom_flower.task import Mlp, load_csv, train

app = ClientApp()


@app.train()
def train_round(msg: Message, context: Context):
    torch.set_num_threads(1)
    cfg = context.run_config
    node = int(context.node_config["partition-id"])
    x, y = load_csv(os.path.join(str(cfg["data-dir"]), f"node-{node}.csv"))
    model = Mlp()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    rnd = int(msg.content["config"]["server-round"])
    loss = train(model, x, y, int(cfg["local-epochs"]), float(cfg["lr"]), int(cfg["batch-size"]), int(cfg["seed"]) * 1000 + rnd * 100 + node)
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"train_loss": loss, "num-examples": len(y)}),
        }
    )
    return Message(content=content, reply_to=msg)
