"""Contract over every registered combiner (issue 14): members mode (service/combine.py in numpy, fed by
the member ONNX files) == the fused ensemble graph in onnxruntime (what production serves) == the torch
combiner, on random member logits with exact ties.

Members here are slices of the input, x (B, M*C) -> logits of member i, so the test chooses every member's
logits exactly: member argmax ties, hard-vote count ties (also with weights whose float32 sum rounds to a
tie), equal probabilities, and large logit gaps. Tolerances: probabilities within ATOL, argmax equal on
every row, ties going to the lowest class index (np.argmax, torch.argmax and onnxruntime ArgMax all do).
"""

from __future__ import annotations

import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from fusion.ensemble import COMBINERS, make_combiner
from fusion.ensemble.calibration import TemperatureScaled
from fusion.export import INPUT_NAME, FusedEnsemble, Probabilities, _session, export_onnx
from service.members import FailurePolicy, MembersEnsemble

ATOL = 1e-6  # probabilities / predictions: float32 graph vs numpy
CALIBRATABLE = ("soft_vote", "logit_mean", "geometric_mean")  # fusion/build.py's list


class Slice(nn.Module):
    """Member i of M: x (B, M*C) -> x[:, i*C:(i+1)*C], its logits (or regression outputs)."""

    def __init__(self, i: int, c: int):
        super().__init__()
        self.lo, self.hi = i * c, (i + 1) * c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.lo:self.hi]


def tied_logits(rng, m: int, c: int) -> np.ndarray:
    """(M, B, C) float32 logits: random rows, then rows built to tie."""
    # ordinary logits, and large gaps (up to 76; past ~87 members mode cannot follow: service/combine.py)
    rows = [rng.normal(0, 3, (m, 64, c)), np.clip(rng.normal(0, 15, (m, 32, c)), -38, 38)]
    top2 = rng.normal(0, 3, (m, 16, c))  # every member's top two logits equal: member argmax ties
    top2[..., 1] = top2.max(-1) + 1.0
    top2[..., 0] = top2[..., 1]
    rows.append(top2)
    rows.append(np.zeros((m, 4, c)))  # all equal: equal probabilities everywhere
    same = np.repeat(rng.normal(0, 3, (1, 8, c)), m, 0)  # identical members
    same[..., -1] = same[..., 0]  # with tied classes 0 and C-1 in some rows
    rows.append(same)
    votes = np.stack([np.arange(m) % c, np.arange(m)[::-1] % c], 1)  # (M, 2): split votes, count ties
    onehot = np.full((m, votes.shape[1], c), -2.0)
    onehot[np.arange(m)[:, None], np.arange(votes.shape[1])[None], votes] = 4.0
    rows.append(onehot)
    if m == 2:  # member 1 is member 0 with classes 0 and 1 swapped: soft/logit/geometric ties
        z0 = rng.normal(0, 3, (1, 8, c))
        z1 = z0.copy()
        z1[..., [0, 1]] = z0[..., [1, 0]]
        rows.append(np.concatenate([z0, z1]))
    if m == 3:  # votes (2, 2, 0): weights 0.1 + 0.2 round to 0.3 in float32 (tests/test_ensemble.py's xfail)
        rows.append(np.stack([np.eye(c)[[2, 0][i == 2]] * 5 for i in range(m)])[:, None, :])
    return np.concatenate(rows, 1).astype(np.float32)


def member_files(tmp_path, m: int, c: int, task: str) -> list:
    """The member ONNX files as `fusion build` exports them (Probabilities wrapper), as callables."""
    X = np.random.default_rng(1).normal(0, 3, (8, m * c)).astype(np.float32)
    models = []
    for i in range(m):
        path = tmp_path / f"{task}_{m}x{c}_member{i}.onnx"
        export_onnx(Probabilities(Slice(i, c), task).eval(), path, X, task=task)
        sess = _session(path)
        models.append(lambda x, s=sess: s.run(None, {INPUT_NAME: x})[0])
    return models


def members_mode(models, combiner_cfg: dict, temperatures=None):
    names = [f"m{i}" for i in range(len(models))]
    method = {"calibration": "temperature", "temperatures": dict(zip(names, temperatures))} if temperatures else None
    entry = SimpleNamespace(members=tuple(names), combiner=combiner_cfg, method=method)
    loaded = SimpleNamespace(manifest=SimpleNamespace(variants={"ensemble": entry}),
                             model=lambda n: models[names.index(n)])
    return MembersEnsemble(loaded, FailurePolicy.parse("strict", 60_000))


def cases():
    for name, cls in sorted(COMBINERS.items()):
        for m, c in ([(2, 3), (3, 4), (4, 5)] if cls.task == "classification" else [(2, 3), (3, 1), (4, 2)]):
            weights = [None] if cls.learned else [None, [float(i % 3 + 1) for i in range(m)]]
            if m == 3 and not cls.learned:
                weights.append([0.1, 0.2, 0.3])
            for w in weights:
                for temps in ([None, [0.5, 2.0, 1.3, 0.8][:m]] if name in CALIBRATABLE else [None]):
                    yield pytest.param(name, m, c, w, temps, {}, id=f"{name}-M{m}C{c}-w{w}-T{temps}")
            if name in CALIBRATABLE:  # the ensemble's output temperature (`weights = "auto"` may choose one)
                for t in (0.6, 1.7):
                    yield pytest.param(name, m, c, weights[-1], None, {"temperature": t}, id=f"{name}-M{m}C{c}-out_T{t}")


def test_every_registered_combiner_is_covered():
    covered = {p.values[0] for p in cases()}
    assert covered == set(COMBINERS), f"not covered: {set(COMBINERS) - covered}"


@pytest.mark.parametrize("name,m,c,weights,temps,params", list(cases()))
def test_members_mode_equals_fused_graph_equals_torch(tmp_path, name, m, c, weights, temps, params):
    rng = np.random.default_rng(zlib.crc32(f"{name}-{m}-{c}".encode()))  # str hash() is salted per process
    task = COMBINERS[name].task
    z = tied_logits(rng, m, c) if task == "classification" else rng.normal(0, 10, (m, 40, c)).astype(np.float32)
    if task == "regression":
        z[:, :8] = np.round(z[:, :8])  # repeated values across members (median picks among equals)
    x = np.ascontiguousarray(z.transpose(1, 0, 2).reshape(z.shape[1], -1))  # (B, M*C)

    combiner = make_combiner(name, m, weights, **params)
    if combiner.learned:  # stacking: a head fitted on other random logits covering every class
        zf = rng.normal(0, 3, (m, 200, c)).astype(np.float32)
        combiner.fit(torch.from_numpy(zf), np.arange(200) % c)
    members = [Slice(i, c) for i in range(m)]
    if temps:
        members = [TemperatureScaled(s, t) for s, t in zip(members, temps)]
    fused = FusedEnsemble(members, combiner).eval()
    with torch.no_grad():
        want = fused(torch.from_numpy(x)).numpy()  # torch

    path = tmp_path / "ensemble.onnx"
    export_onnx(fused, path, x[:16], task=task)  # the build's export, with its own parity gate
    graph = _session(path).run(None, {INPUT_NAME: x})[0]  # onnxruntime

    ens = members_mode(member_files(tmp_path, m, c, task), combiner.config(), temps)
    try:
        got, extra = ens(x)  # numpy, as members mode serves it
    finally:
        ens.close()
    assert not extra["degraded"]

    np.testing.assert_allclose(graph, want, atol=ATOL, rtol=0, err_msg="onnxruntime vs torch")
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=1e-6 if task == "regression" else 0,
                               err_msg="members mode (numpy) vs torch")
    if task == "classification":
        assert_same_decisions(want, graph, got)


def exact_ties(p: np.ndarray) -> np.ndarray:
    return (p == p.max(-1, keepdims=True)).sum(-1) > 1


def top_set(p: np.ndarray) -> np.ndarray:
    return p == p.max(-1, keepdims=True)


def assert_same_decisions(want: np.ndarray, graph: np.ndarray, got: np.ndarray) -> None:
    """argmax equal on every row, ties to the lowest index. Rows whose top two differ by under 1e-6 without
    being the same exact tie in torch and onnxruntime are left out: there the sum order decides (torch and
    onnxruntime themselves disagree on soft votes like hi+lo+lo+lo vs lo+lo+hi+lo: each sees a different tie)."""
    top2 = np.sort(want, -1)[:, -2:]
    tied = exact_ties(want) & (top_set(want) == top_set(graph)).all(-1)
    decided = (top2[:, 1] - top2[:, 0] >= 1e-6) | tied
    assert decided.mean() > 0.8, f"only {decided.sum()} of {len(want)} rows are decided; the test lost its power"
    ref = want.argmax(-1)
    for label, out in (("onnxruntime", graph), ("members mode (numpy)", got)):
        bad = np.flatnonzero(decided & (out.argmax(-1) != ref))
        assert len(bad) == 0, f"{label} argmax differs from torch on rows {bad.tolist()}: {out[bad].tolist()} vs {want[bad].tolist()}"
    lost = np.flatnonzero(tied & ~(top_set(got) == top_set(want)).all(-1))
    assert len(lost) == 0, f"rows {lost.tolist()} tie in torch and onnxruntime but not the same way in members mode: {got[lost].tolist()}"


def test_members_mode_claims_exactly_the_registered_combiners():
    from service.combine import NAMES

    assert set(NAMES) == set(COMBINERS), f"members mode names {sorted(NAMES)}; the registry has {sorted(COMBINERS)}"


@pytest.mark.parametrize("config,match", [
    ({"name": "stacking", "weights": None, "C": 1.0}, "fitted stacking head"),  # a KeyError (500) before
    ({"name": "borda"}, "cannot combine with 'borda'"),
])
def test_members_mode_refuses_what_it_cannot_combine_with_a_clear_error(config, match):
    from fusion.errors import ConfigError
    from service.combine import combine

    with pytest.raises(ConfigError, match=match):
        combine(config, np.full((2, 1, 3), 1 / 3, dtype=np.float32))
