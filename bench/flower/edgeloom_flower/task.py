"""The model, data and training of the Flower arm: the same as edgeloom-runner's.

The model is edgeloom's built-in Mlp (64-128-64-10, ReLU), with the same tensor names
(fc1, fc2, fc3); training is SGD with momentum 0.9 on shuffled mini-batches with cross
entropy, as the runner's Federated train step.
"""

import torch
from torch import nn


class Mlp(nn.Module):
    def __init__(self, features: int = 64, classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(features, 128)
        self.fc2 = nn.Linear(128, 64)
        self.fc3 = nn.Linear(64, classes)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def load_csv(path: str):
    """Features and labels of a node CSV (features..., label)."""
    xs, ys = [], []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            v = line.split(",")
            xs.append([float(t) for t in v[:-1]])
            ys.append(int(v[-1]))
    return torch.tensor(xs, dtype=torch.float32), torch.tensor(ys, dtype=torch.int64)


def load_safetensors(model: nn.Module, path: str):
    """Loads edgeloom's initial model (a safetensors file) into `model`."""
    import json
    import struct

    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    state = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        t = torch.frombuffer(bytearray(raw[8 + n + start : 8 + n + end]), dtype=torch.float32)
        state[name] = t.reshape(info["shape"]).clone()
    model.load_state_dict(state)


def train(model: nn.Module, x, y, epochs: int, lr: float, batch: int, seed: int) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    model.train()
    last = float("nan")
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        total, batches = 0.0, 0
        for b in range(0, len(y), batch):
            idx = order[b : b + batch]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total += loss.item()
            batches += 1
        last = total / max(batches, 1)
    return last


def accuracy(model: nn.Module, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()
