"""The serving benchmark's reference arm: what a user would write instead of edgeloom.

A FastAPI app around torch.jit.load, served by uvicorn. Same model file, same JSON as
edgeloom's plain form ({"instances": rows} -> {"predictions": rows}). The handler is a
plain `def`, so FastAPI runs it in its thread pool and concurrent requests overlap
(libtorch releases the GIL): the strongest default a user gets.

    python server.py <model.pt> <port> <torch threads> <uvicorn workers>
"""

import os
import sys

import torch
from fastapi import FastAPI
from pydantic import BaseModel

MODEL = os.environ.get("EDGELOOM_BENCH_MODEL") or sys.argv[1]
THREADS = int(os.environ.get("EDGELOOM_BENCH_THREADS") or sys.argv[3])

torch.set_num_threads(THREADS)
model = torch.jit.load(MODEL)
model.eval()
app = FastAPI()


class Request(BaseModel):
    instances: list[list[float]]


@app.post("/predict")
def predict(req: Request):
    with torch.inference_mode():
        y = model(torch.tensor(req.instances, dtype=torch.float32))
    return {"predictions": y.tolist()}


if __name__ == "__main__":
    import uvicorn

    os.environ["EDGELOOM_BENCH_MODEL"] = sys.argv[1]
    os.environ["EDGELOOM_BENCH_THREADS"] = sys.argv[3]
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    uvicorn.run(
        "server:app",
        host="127.0.0.1",
        port=int(sys.argv[2]),
        workers=int(sys.argv[4]),
        log_level="warning",
    )
