"""Cross-validated logistic-regression probes, and the probe-performance matrix P[layer, task].

A probe is scikit-learn's L2-regularised ``LogisticRegression`` on standardised pooled features.
Its score is measured out of fold on stratified K folds, and the regularisation strength is chosen
among ``Cs`` by out-of-fold log-loss, which is what ``LogisticRegressionCV(Cs, cv=folds,
scoring="neg_log_loss")`` does; we run the loop ourselves so the same out-of-fold predictions also
give the accuracy, and so every layer of a task is scored on the *same* folds (differences between
layers are then paired, which makes marginal gains much less noisy).

``P[l, t]`` is the out-of-fold accuracy; ``skill[l, t] = 1 - logloss / H(labels)`` is kept too.
Row 0 is the embedding output; row ``l`` the output of the ``l``-th layer (1-based).
"""

from __future__ import annotations

import csv
import io
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import MoeSlimError
from .features import Features
from .tasks import Task

DEFAULT_CS: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0)


def make_folds(labels: list[str], n_folds: int = 5, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(labels)
    smallest = min(np.unique(y, return_counts=True)[1])
    k = max(2, min(n_folds, int(smallest)))
    if smallest < 2:
        raise MoeSlimError("a probe label has fewer than 2 examples; cross-validation needs at least 2 per label")
    return list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))


def probe_score(X: np.ndarray, labels: list[str], folds: list[tuple[np.ndarray, np.ndarray]],
                Cs: tuple[float, ...] = DEFAULT_CS) -> dict[str, float]:
    """Out-of-fold accuracy and log-loss skill of a probe on features ``X`` (``[n, d]``)."""
    from threadpoolctl import threadpool_limits

    # BLAS threads make these small fits ~10x slower (oversubscription); one thread is fastest
    with threadpool_limits(1):
        return _probe_score(X, labels, folds, Cs)


def _probe_score(X: np.ndarray, labels: list[str], folds: list[tuple[np.ndarray, np.ndarray]],
                 Cs: tuple[float, ...]) -> dict[str, float]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    y_str = np.asarray(labels)
    classes, y = np.unique(y_str, return_inverse=True)
    n, k = len(y), len(classes)
    X = np.asarray(X, dtype=np.float64)
    proba = np.zeros((len(Cs), n, k))
    for train, test in folds:
        mu = X[train].mean(0)
        sd = X[train].std(0)
        sd[sd < 1e-8] = 1.0
        Xtr, Xte = (X[train] - mu) / sd, (X[test] - mu) / sd
        clf = LogisticRegression(C=Cs[0], max_iter=300, warm_start=True, tol=1e-4)
        for ci, C in enumerate(Cs):
            clf.set_params(C=C)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf.fit(Xtr, y[train])
            p = np.zeros((len(test), k))
            p[:, clf.classes_] = clf.predict_proba(Xte)
            proba[ci, test] = p
    eps = 1e-12
    logloss = -np.log(np.clip(proba[:, np.arange(n), y], eps, 1.0)).mean(1)
    best = int(np.argmin(logloss))
    prior = np.bincount(y, minlength=k) / n
    entropy = float(-(prior[prior > 0] * np.log(prior[prior > 0])).sum())
    acc = float((proba[best].argmax(1) == y).mean())
    return {
        "accuracy": acc,
        "logloss": float(logloss[best]),
        "skill": float(1.0 - logloss[best] / entropy) if entropy > 0 else 0.0,
        "C": float(Cs[best]),
        "chance": float(prior.max()),
    }


@dataclass
class ProbeMatrix:
    """P[stack][layer, task] (accuracy) and skill, with the tasks and their weights."""

    tasks: list[str]
    weights: dict[str, float]
    accuracy: dict[str, np.ndarray]
    skill: dict[str, np.ndarray]
    chance: dict[str, float]
    block_influence: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    angular: dict[str, np.ndarray] = field(default_factory=dict)  # [L+1, L+1] angular distance between rows

    def norm_weights(self) -> np.ndarray:
        w = np.array([self.weights.get(t, 1.0) for t in self.tasks], dtype=float)
        return w / w.sum()

    def weighted(self, stack: str) -> np.ndarray:
        """Task-weighted accuracy per row of a stack."""
        return self.accuracy[stack] @ self.norm_weights()

    def to_json(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks,
            "weights": self.weights,
            "chance": self.chance,
            "rows": "row 0 is the embedding output; row l is the output of layer l-1 (0-based index)",
            "accuracy": {k: v.round(6).tolist() for k, v in self.accuracy.items()},
            "skill": {k: v.round(6).tolist() for k, v in self.skill.items()},
            "weighted_accuracy": {k: self.weighted(k).round(6).tolist() for k in self.accuracy},
            "block_influence": {k: np.asarray(v).round(6).tolist() for k, v in self.block_influence.items()},
            "angular_distance": {k: np.asarray(v).round(6).tolist() for k, v in self.angular.items()},
            "meta": self.meta,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ProbeMatrix:
        return cls(
            tasks=list(d["tasks"]), weights=dict(d["weights"]),
            accuracy={k: np.asarray(v, float) for k, v in d["accuracy"].items()},
            skill={k: np.asarray(v, float) for k, v in d["skill"].items()},
            chance=dict(d.get("chance", {})),
            block_influence={k: np.asarray(v, float) for k, v in d.get("block_influence", {}).items()},
            meta=dict(d.get("meta", {})),
            angular={k: np.asarray(v, float) for k, v in d.get("angular_distance", {}).items()},
        )

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["stack", "row", "layer"] + [f"acc:{t}" for t in self.tasks] + [f"skill:{t}" for t in self.tasks]
                   + ["weighted_accuracy", "block_influence"])
        for stack, acc in self.accuracy.items():
            wa = self.weighted(stack)
            bi = self.block_influence.get(stack)
            for r in range(acc.shape[0]):
                w.writerow([stack, r, "embeddings" if r == 0 else r - 1]
                           + [f"{x:.4f}" for x in acc[r]] + [f"{x:.4f}" for x in self.skill[stack][r]]
                           + [f"{wa[r]:.4f}", "" if bi is None or r == 0 else f"{bi[r - 1]:.5f}"])
        return buf.getvalue()


def split_features(features: Features, sizes: list[int]) -> list[Features]:
    """Per-task views of features extracted on the concatenated texts of all tasks."""
    out, start = [], 0
    for n in sizes:
        out.append(Features({k: v[:, start:start + n] for k, v in features.pooled.items()},
                            features.block_influence, features.n_tokens, features.pooling, features.angular))
        start += n
    return out


def probe_matrix(features: list[Features], tasks: list[Task], weights: dict[str, float], *,
                 n_folds: int = 5, seed: int = 0, Cs: tuple[float, ...] = DEFAULT_CS,
                 progress: Any = None) -> ProbeMatrix:
    """Probe every layer of every stack on every task (``features[i]`` belongs to ``tasks[i]``)."""
    stacks = list(features[0].pooled)
    acc = {s: np.zeros((features[0].pooled[s].shape[0], len(tasks))) for s in stacks}
    skill = {s: np.zeros_like(acc[s]) for s in stacks}
    chance: dict[str, float] = {}
    for ti, (feat, task) in enumerate(zip(features, tasks)):
        folds = make_folds(task.labels, n_folds, seed)
        for s in stacks:
            for r in range(feat.pooled[s].shape[0]):
                sc = probe_score(feat.pooled[s][r], task.labels, folds, Cs)
                acc[s][r, ti] = sc["accuracy"]
                skill[s][r, ti] = sc["skill"]
                chance[task.name] = sc["chance"]
                if progress is not None:
                    progress(task.name, s, r)
    bi = {k: np.asarray(v) for k, v in features[0].block_influence.items()}
    return ProbeMatrix([t.name for t in tasks], dict(weights), acc, skill, chance, bi,
                       {"n_folds": n_folds, "seed": seed, "Cs": list(Cs), "pooling": features[0].pooling,
                        "examples": {t.name: len(t.texts) for t in tasks}},
                       {k: np.asarray(v) for k, v in features[0].angular.items()})


def final_scores(features: list[Features], tasks: list[Task], *, n_folds: int = 5, seed: int = 0,
                 Cs: tuple[float, ...] = DEFAULT_CS, stack: str | None = None) -> dict[str, dict[str, float]]:
    """Probe scores of the final representation only (for measuring a slimmed model)."""
    out = {}
    for feat, task in zip(features, tasks):
        folds = make_folds(task.labels, n_folds, seed)
        out[task.name] = probe_score(feat.final(stack), task.labels, folds, Cs)
    return out
