"""OpenInfer's peer in bench/peers.py: the FastAPI app a user would write to serve an ONNX model.

    uvicorn peers_app:app --app-dir bench --workers 2 --loop uvloop --http httptools --no-access-log

onnxruntime runs in-process, one intra-op thread (as OpenInfer's workers); POST the input's raw float32
bytes (rows of 64), get the output's raw float32 bytes back. $PEERS_MODEL names the model file (default:
examples/models/tiny). Nothing here is tuned beyond what the issue asks: it is the 20-line baseline.
"""
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, Request, Response

MODEL = os.environ.get("PEERS_MODEL", str(Path(__file__).resolve().parent.parent / "examples/models/tiny/1/model.onnx"))
options = ort.SessionOptions()
options.intra_op_num_threads = 1
session = ort.InferenceSession(MODEL, options, providers=["CPUExecutionProvider"])
app = FastAPI()


@app.post("/infer")
async def infer(request: Request) -> Response:
    x = np.frombuffer(await request.body(), dtype=np.float32).reshape(-1, 64)
    (y,) = session.run(["y"], {"x": x})
    return Response(content=y.tobytes(), media_type="application/octet-stream")
