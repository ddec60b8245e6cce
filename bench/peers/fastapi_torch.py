"""Peer: a hand-written FastAPI app with per-member torch eager models (what most teams start with).

    PEER_SPEC=.../spec.json uvicorn bench.peers.fastapi_torch:app --port 8000

The members are the same weights the bundle was built from (timm modules + safetensors; the BERTs'
Hugging Face directories), run in `torch.inference_mode()` one after another in a sync endpoint (FastAPI's
thread pool), softmaxed and averaged. torch's default threads (all cores).
"""

from __future__ import annotations

import numpy as np
import torch
from fastapi import FastAPI
from pydantic import BaseModel

from bench.peers.common import Decoder, load_spec

SPEC = load_spec()
DECODE = Decoder(SPEC)


def _load(m: dict):
    if SPEC["kind"] == "image":
        import timm
        from safetensors.torch import load_file

        model = timm.create_model(m["source"].split(":", 1)[1], pretrained=False, **m["args"])
        model.load_state_dict(load_file(m["weights"]))
        return model.eval()
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(m["hf_dir"]).eval()


MODELS = [_load(m) for m in SPEC["members"]]
if SPEC["kind"] == "image":
    _img = SPEC["image"]
    SCALE = float(_img["scale"])
    MEAN = torch.tensor(_img["mean"]).view(1, 3, 1, 1)
    STD = torch.tensor(_img["std"]).view(1, 3, 1, 1)

app = FastAPI()


class PredictRequest(BaseModel):
    inputs: list[str]


@app.post("/predict")
def predict(req: PredictRequest) -> dict:
    feeds = DECODE(req.inputs)
    with torch.inference_mode():
        if SPEC["kind"] == "image":
            x = (torch.from_numpy(feeds["pixels"]) * SCALE - MEAN) / STD
            outs = [m(x).softmax(-1) for m in MODELS]
        else:
            t = {k: torch.from_numpy(v) for k, v in feeds.items()}
            outs = [m(**t).logits.softmax(-1) for m in MODELS]
        probs = torch.stack(outs).mean(0).numpy()
    return {"probabilities": np.asarray(probs, np.float32).tolist()}
