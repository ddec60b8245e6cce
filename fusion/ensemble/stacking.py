"""Stacking (Wolpert 1992): a multinomial logistic-regression head on member probabilities.

The head is fitted on predictions the members did not train on: the validation split with
pre-trained members (scikit-learn `StackingClassifier(cv="prefit")`), or out-of-fold predictions
of members refitted per fold (`fit_out_of_fold`). Features are the members' probabilities
concatenated member-major, `(n_samples, n_members * n_classes)`, as scikit-learn's
`stack_method="predict_proba"` (it drops the first column only for binary problems; so do we).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from fusion.ensemble.base import Combiner, register_combiner
from fusion.errors import ConfigError


@register_combiner("stacking", "classification")
class Stacking(Combiner):
    """Logistic-regression head over concatenated member probabilities; fitted tensors `coef_`, `intercept_`."""

    learned = True

    def __init__(self, n_members: int, weights: Sequence[float] | None = None, *, C: float = 1.0, max_iter: int = 1000):
        super().__init__(n_members, weights)
        if weights is not None:
            raise ConfigError("stacking learns its own weights; expected no --weights, got some")
        self.C, self.max_iter = float(C), int(max_iter)

    @staticmethod
    def features(z: torch.Tensor) -> torch.Tensor:
        """Member logits (M, N, C) -> stacked probabilities (N, M*C) (binary: (N, M))."""
        p = torch.softmax(z, -1)
        if p.shape[-1] == 2:
            p = p[..., 1:]
        return p.permute(1, 0, 2).reshape(p.shape[1], -1)

    def head(self) -> LogisticRegression:
        return LogisticRegression(C=self.C, max_iter=self.max_iter)

    def fit(self, member_outputs: torch.Tensor, y) -> "Stacking":
        """member_outputs: logits (M, N, C) on held-out rows; y: (N,) class indices."""
        self.check_input(member_outputs)
        X = self.features(member_outputs).double().numpy()
        clf = self.head().fit(X, np.asarray(y))
        self.set_head(clf.coef_, clf.intercept_, clf.classes_, member_outputs.shape[-1])
        return self

    def set_head(self, coef: np.ndarray, intercept: np.ndarray, classes: np.ndarray, n_classes: int) -> None:
        if len(classes) != n_classes or (np.asarray(classes) != np.arange(n_classes)).any():
            raise ConfigError(
                f"stacking needs every class 0..{n_classes - 1} in its training rows; got classes {list(classes)}"
            )
        self.register_buffer("coef_", torch.tensor(coef, dtype=torch.float32))  # (C or 1, M*C)
        self.register_buffer("intercept_", torch.tensor(intercept, dtype=torch.float32))  # (C or 1,)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.check_input(z)
        if not hasattr(self, "coef_"):
            raise ConfigError("this stacking combiner is not fitted yet; call fit() first")
        scores = self.features(z) @ self.coef_.T + self.intercept_  # (N, C) or (N, 1) when binary
        if scores.shape[-1] == 1:  # binary: sklearn's decision function is the logit of class 1
            scores = torch.cat([torch.zeros_like(scores), scores], -1)
        return torch.softmax(scores, -1)

    def config(self) -> dict:
        cfg = {"name": self.name, "weights": None, "C": self.C, "fit_on": getattr(self, "fit_on_", "validation")}
        if hasattr(self, "coef_"):  # the fitted head, so that members mode can combine without torch
            cfg |= {"coef": self.coef_.tolist(), "intercept": self.intercept_.tolist()}
        return cfg


def fit_out_of_fold(
    stacking: Stacking, refit_member_logits, X: np.ndarray, y: np.ndarray, n_splits: int = 5,
) -> Stacking:
    """Fit the head on out-of-fold member predictions (scikit-learn `StackingClassifier(cv=5)`).

    refit_member_logits(X_fit, y_fit, X_pred) -> logits (M, len(X_pred), C): refits every member on
    the fold's training rows and predicts the held-out rows. Folds: `StratifiedKFold(n_splits)`, no shuffle.
    """
    from sklearn.model_selection import StratifiedKFold

    oof = None
    for fit_idx, pred_idx in StratifiedKFold(n_splits=n_splits).split(X, y):
        z = refit_member_logits(X[fit_idx], y[fit_idx], X[pred_idx])
        if oof is None:
            oof = torch.zeros(z.shape[0], len(X), z.shape[-1])
        oof[:, pred_idx] = z
    stacking.fit(oof, y)
    stacking.fit_on_ = f"out_of_fold_{n_splits}"
    return stacking
