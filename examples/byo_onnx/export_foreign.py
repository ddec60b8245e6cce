"""A member that reaches fusion-serve only as an ONNX file: a small CNN written and exported here, apart
from fusion's code, with torch's legacy TorchScript exporter at opset 9 (as many files in the wild were).

Its input is named `x` (not the bundle's `pixels`), it normalises the raw 0..16 pixels itself, and it has
two outputs, `logits` and `probs`; the recipe picks `probs` and declares it `output = "probabilities"`.

    python examples/byo_onnx/export_foreign.py --data work/digits.npz --out work/foreign_cnn.onnx [--epochs N]

It trains on the train split only (fusion.data.split_named, the split `fusion build` uses), so the
validation and test rows stay unseen by every member.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn


class ForeignCNN(nn.Module):
    """x (B, 64) raw pixels 0..16 -> (logits (B, 10), probs (B, 10))."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 12, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(12, 24, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(24 * 2 * 2, 10)

    def forward(self, x):
        h = self.conv((x / 16.0).reshape(-1, 1, 8, 8))
        logits = self.head(h.flatten(1))
        return logits, torch.softmax(logits, -1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=30)
    args = ap.parse_args(argv)

    from fusion.data import load_named
    from fusion.bundle import TensorSpec

    data = load_named(args.data, [TensorSpec("pixels", "float32", ("batch", 64))])
    X, y = torch.from_numpy(data.X_train["pixels"]), torch.from_numpy(data.y_train)
    torch.manual_seed(7)
    model = ForeignCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(args.epochs):
        for idx in torch.randperm(len(X)).split(64):
            loss = nn.functional.cross_entropy(model(X[idx])[0], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (X[:2],), str(out), dynamo=False, opset_version=9, input_names=["x"],
                          output_names=["logits", "probs"],
                          dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}, "probs": {0: "n"}})
    print(f"wrote {out} (TorchScript exporter, opset 9)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
