"""Peer baselines (issue 18, part 1): the same ensemble served by the servers users would pick instead.

- `ensembles.py` builds the two ensembles (image: resnet18 + resnet50 + vit_small at 224x224; text: three
  BERT-mini encoders at sequence length 128; random seeded weights) as OUR bundle, with `fusion build` of a
  recipe, and writes `spec.json`: what every peer loads (the bundle's `members/*.onnx`, or the same weights
  in torch for the FastAPI peer), so every server computes the same function;
- `common.py` is what every peer app shares (decode a request, run members, average); it needs only numpy,
  Pillow, tokenizers and onnxruntime, so it imports in the peers' own venvs;
- `bentoml_plain.py`, `fastapi_torch.py`, `ray_serve.py`, `kserve_model.py`: the peers, each written the
  way its project's documentation teaches;
- `harness.py` starts each server, checks its answers against ours, drives it with bench/loadgen.py (wrk,
  closed loop, at 1/8/32 clients; and an open-loop constant-arrival-rate run) and renders docs/PEERS.md.

    python -m bench.peers.harness [--smoke] [--only image|text] [--peers ours,bentoml,...]
"""
