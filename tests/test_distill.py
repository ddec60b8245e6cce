"""Knowledge distillation: the loss against a hand computation, augmentations, training, export."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from fusion.distill import (
    OnnxTeacher, add_noise, distill, kd_loss, make_student, mixup, save_student, shift_images, teacher_logits,
)
from fusion.errors import ConfigError
from fusion.recipe import DistillSection, parse_recipe

FAST = DistillSection(hidden=(32,), epochs=3, patience=0, seed=0)


def _np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_kd_loss_matches_a_hand_computation():
    zs = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    zt = np.array([[2.0, 1.0, 0.0], [0.5, 0.5, 2.0]])
    y = np.array([1, 2])
    T, alpha = 3.0, 0.7
    ps, pt = _np_softmax(zs / T), _np_softmax(zt / T)
    kl = np.sum(pt * (np.log(pt) - np.log(ps))) / len(zs)  # batchmean: sum over classes, mean over rows
    ce = -np.mean(np.log(_np_softmax(zs)[np.arange(2), y]))
    expected = alpha * T * T * kl + (1 - alpha) * ce
    got = kd_loss(torch.tensor(zs), torch.tensor(zt), torch.tensor(y), temperature=T, alpha=alpha)
    assert float(got) == pytest.approx(expected, rel=1e-12)


def test_kd_loss_soft_targets_and_limits():
    zs, zt = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    y = torch.tensor([0, 3, 1, 4])
    onehot = torch.nn.functional.one_hot(y, 5).double()
    hard = kd_loss(zs, zt, y, temperature=2.0, alpha=0.4)
    soft = kd_loss(zs, zt, onehot, temperature=2.0, alpha=0.4)
    assert float(hard) == pytest.approx(float(soft), rel=1e-12)
    assert float(kd_loss(zs, zs, y, temperature=4.0, alpha=1.0)) == pytest.approx(0.0, abs=1e-12)
    ce = torch.nn.functional.cross_entropy(zs, y)
    assert float(kd_loss(zs, zt, y, temperature=4.0, alpha=0.0)) == pytest.approx(float(ce), rel=1e-12)


def test_teacher_logits_soften_probabilities_like_logits():
    z = torch.randn(6, 4, dtype=torch.float64)
    p = torch.softmax(z, -1)
    T = 3.0
    assert torch.allclose(torch.softmax(teacher_logits(p) / T, -1), torch.softmax(z / T, -1), atol=1e-10)
    votes = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])  # hard-vote fractions with exact zeros
    assert torch.isfinite(teacher_logits(votes)).all()


def test_shift_moves_pixels_and_replicates_edges():
    img = torch.arange(16.0).reshape(1, 16)  # one 1x4x4 image
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        out = shift_images(img, (1, 4, 4), 1, gen).reshape(4, 4)
        src = img.reshape(4, 4)
        # every output pixel is the source pixel at (r + dy, c + dx) with indices clamped (replicate padding)
        matches = []
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                rows = torch.clamp(torch.arange(4) + dy, 0, 3)
                cols = torch.clamp(torch.arange(4) + dx, 0, 3)
                matches.append(torch.equal(out, src[rows][:, cols]))
        assert sum(matches) == 1


def test_noise_and_mixup_are_seeded_and_well_formed():
    x = torch.randn(8, 5)
    y = torch.nn.functional.one_hot(torch.arange(8) % 3, 3).float()
    scale = torch.tensor([1.0, 0.0, 2.0, 1.0, 1.0])
    a = add_noise(x, scale, 0.1, torch.Generator().manual_seed(1))
    b = add_noise(x, scale, 0.1, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and torch.equal(a[:, 1], x[:, 1])  # a constant feature gets no noise
    xm, ym = mixup(x, y, 0.2, torch.Generator().manual_seed(2))
    assert torch.allclose(ym.sum(-1), torch.ones(8)) and xm.shape == x.shape


def test_recipe_checks_the_distill_section():
    with pytest.raises(ConfigError, match="alpha"):
        parse_recipe({"distill": {"alpha": 1.5}})
    with pytest.raises(ConfigError, match="augment"):
        parse_recipe({"distill": {"augment": ["rotate"]}})
    assert parse_recipe({"distill": {"epochs": 5, "augment": ["mixup"]}}).distill.epochs == 5


def _agreement(student, teacher, X) -> float:
    with torch.no_grad():
        x = torch.from_numpy(X)
        return float((student(x).argmax(-1) == teacher(x).argmax(-1)).float().mean())


@pytest.fixture(scope="module")
def teacher(tiny_recipe, digits):
    """The tiny zoo's soft-vote ensemble: three MLPs and one CNN."""
    from fusion.build import build_ensemble, ensure_zoo

    members = ensure_zoo(tiny_recipe, digits)
    assert {m.spec.arch for m in members} == {"mlp", "cnn"}
    return build_ensemble(tiny_recipe, members, digits)


def test_a_few_seeded_steps_raise_agreement_with_a_heterogeneous_teacher(teacher, digits):
    cfg = replace(FAST, augment=("noise", "shift", "mixup"))
    before = _agreement(make_student(digits, cfg), teacher, digits.X_val)
    student, history = distill(teacher, digits, cfg, progress=False)
    after = _agreement(student, teacher, digits.X_val)
    assert after > before + 0.3, (before, after)
    assert after == pytest.approx(history.best_val_agreement)
    assert history.epochs_run == 3 and 1 <= history.best_epoch <= 3
    again, _ = distill(teacher, digits, cfg, progress=False)  # seeded: the same weights again
    for k, v in student.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_early_stopping_keeps_the_best_epoch(teacher, digits):
    cfg = replace(FAST, epochs=6, patience=1, lr=3e-2)  # a large step size makes agreement wobble
    student, h = distill(teacher, digits, cfg, progress=False)
    best = max(zip(h.val_agreement, [-k for k in h.val_kl]))
    assert (h.best_val_agreement, -h.val_kl[h.best_epoch - 1]) == best
    assert h.epochs_run == len(h.train_loss) <= 6
    assert h.epochs_run == 6 or h.epochs_run == h.best_epoch + 1
    assert _agreement(student, teacher, digits.X_val) == pytest.approx(h.best_val_agreement)


def test_distilled_onnx_passes_parity_and_reloads(teacher, digits, tmp_path):
    import onnxruntime as ort

    from fusion.zoo import load_member

    student, history = distill(teacher, digits, FAST, progress=False)
    paths = save_student(student, digits, FAST, history, tmp_path, onnx=True)  # export_onnx gates parity
    sess = ort.InferenceSession(str(paths["onnx"]), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": digits.X_test})[0]
    with torch.no_grad():
        expected = torch.softmax(student(torch.from_numpy(digits.X_test)), -1).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    reloaded, spec = load_member(paths["safetensors"])
    assert spec.scenario == "distilled"
    with torch.no_grad():
        assert torch.equal(reloaded(torch.from_numpy(digits.X_val)), student(torch.from_numpy(digits.X_val)))


def test_cnn_student_and_onnx_teacher(tiny_bundle, digits):
    """A bundle's ensemble file (run in onnxruntime) teaches a small CNN student."""
    from fusion.bundle import read_bundle

    teacher = OnnxTeacher(read_bundle(tiny_bundle).read_verified("ensemble"))
    cfg = replace(FAST, arch="cnn", args={"channels": [4, 8], "hidden": 16}, lr=5e-3)
    before = _agreement(make_student(digits, cfg), teacher, digits.X_val)
    student, _ = distill(teacher, digits, cfg, progress=False)
    assert _agreement(student, teacher, digits.X_val) > before + 0.3


def test_regression_data_is_refused(digits):
    reg = replace(digits, task="regression")
    with pytest.raises(ConfigError, match="classification"):
        distill(torch.nn.Identity(), reg, FAST, progress=False)


def test_cli_distill_from_a_zoo_and_from_a_bundle(tiny_zoo, tiny_bundle, tmp_path, capsys):
    from fusion.cli import main

    args = ["--hidden", "16", "--epochs", "1"]
    assert main(["distill", "--zoo", str(tiny_zoo), *args, "--out", str(tmp_path / "a"), "--onnx"]) == 0
    assert {p.name for p in (tmp_path / "a").iterdir()} == {
        "distilled.safetensors", "distilled.json", "distilled.history.json", "distilled.onnx",
    }
    assert main(["distill", "--bundle", str(tiny_bundle), *args, "--out", str(tmp_path / "b"), "--name", "s"]) == 0
    history = json.loads((tmp_path / "b" / "s.history.json").read_text())
    assert history["method"]["teacher"].endswith(":ensemble") and history["epochs_run"] == 1
    assert "validation agreement" in capsys.readouterr().out
    assert main(["distill", "--bundle", str(tiny_bundle), "--teacher", "nope", *args, "--out", str(tmp_path / "c")]) == 2
    assert "unknown variant 'nope'" in capsys.readouterr().err
