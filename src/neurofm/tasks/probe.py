"""The linear probe in closed form (``--mode linear``, ``linear_fit="closed"``, the default).

A frozen encoder's features are computed once on what the predictor reads: each training scan whole
(padded to a multiple of the encoder's stride; a fixed-size backbone such as a ViT: its windows, tiled
without overlap; :func:`neurofm.infer.runtime.global_windows`), averaged over the mirror flips when the
predictor averages over them (``tta``), labelled with the case's target; then

* regression: ridge regression on the standardised target,
* classification: L2-penalised (multinomial) logistic regression with balanced class weights,

with the penalty chosen by cross-validation over the training *subjects* (the windows and sessions of
one subject stay in one fold), and written into the model's linear head. This is how the field reads a
foundation model's features with a few labelled subjects (scikit-learn on frozen embeddings): the
penalty keeps a 24-subject fit near the constant predictor where the features carry nothing, which a
head trained by a few hundred gradient steps on random crops does not. The predictor then pools the
windows' outputs exactly as for a head trained by gradient descent.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from neurofm.data.finetune import CaseSet
from neurofm.data.pretrain import health_target
from neurofm.data.sampling import stack_contrasts
from neurofm.errors import ConfigError
from neurofm.infer.runtime import FLIPS, flip, global_windows
from neurofm.store import Store

#: penalties tried: ridge's alpha, and the inverse of logistic regression's C, on standardised features
PENALTIES = np.logspace(-2, 5, 15)


@torch.no_grad()
def window_features(
    model: Any,
    store: Store,
    cs: CaseSet,
    cases: list,
    patch: int,
    whole: int = 0,
    flips: bool = False,
    per_scan: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Standardised features ``(N, D)`` of every window of ``cases``, their targets and subjects.

    ``flips``: each window's features averaged over the 8 mirror flips, as the predictor's test-time
    augmentation averages a linear head's outputs. Sets the model's feature standardisation from the
    same windows (every flip: the predictor standardises each) first."""
    per_case: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    targets, subjects = [], []
    for c in cases:
        images = {k: np.asarray(store.read(c.key, k), np.float32) for k in c.contrasts}
        x, present = stack_contrasts(images, cs.contrasts)
        wins = global_windows(x[None], patch, whole)
        pr = torch.from_numpy(np.broadcast_to(present, (len(wins), len(present))).copy())
        views = [np.ascontiguousarray(flip(wins, f)) for f in (FLIPS if flips else [()])]
        per_case.append([(torch.from_numpy(v), pr) for v in views])
        targets += [c.target] * len(wins)
        subjects += [c.subject] * len(wins)
    # a linear probe reads the fused features only (no learned pooling): one pass sets the standardisation
    # and gives the features, (case, flip, window) in order
    model.eval()
    feats = model.standardise(model.fit_feature_norm([b for batches in per_case for b in batches]))
    n_views, n_wins = len(per_case[0]), [len(batches[0][0]) for batches in per_case]
    per_view = torch.split(feats, [n_views * n for n in n_wins])
    mean = [f.view(n_views, n, -1).mean(0) for f, n in zip(per_view, n_wins, strict=True)]  # over the flips
    if per_scan:  # one row per scan: its windows' features averaged (a linear head's outputs averaged alike)
        mean = [m.mean(0, keepdim=True) for m in mean]
        keep = np.cumsum([0, *n_wins[:-1]])
        targets, subjects = [targets[i] for i in keep], [subjects[i] for i in keep]
    return torch.cat(mean).double().numpy(), np.asarray(targets), np.asarray(subjects)


def fit_linear_probe(
    model: Any,
    store: Store,
    cs: CaseSet,
    train: list,
    info: dict[str, Any],
    rule: str = "1se",
    tta: bool = True,
    head: torch.nn.Linear | None = None,
    features: str = "all",
    per_scan: bool = False,
) -> dict[str, Any]:
    """Fit ``head`` (an ``nn.Linear`` reading the standardised fused features; default ``model.head``) in closed
    form on the frozen features of ``train``, read as the predictor will read them (``info``, the task
    description: ``patch``, ``whole_scan``, ``target_mean`` and ``target_std``); returns what was chosen (penalty,
    cross-validated score, windows). ``head=model.probe`` is LP-FT's start (``head_init=probe``). ``features``: which
    fused features it weighs (:meth:`~neurofm.models.downstream.DownstreamModel.feature_columns`); the others get
    zero weight."""
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.metrics import log_loss, make_scorer
    from sklearn.model_selection import GridSearchCV, GroupKFold, StratifiedGroupKFold

    x, y, groups = window_features(
        model, store, cs, train, info["patch"], int(info.get("whole_scan", 0)), tta, per_scan=per_scan
    )
    cols = model.feature_columns(features).numpy()
    width, x = x.shape[1], x[:, cols]
    n_subjects = len(set(groups))
    folds = min(5, n_subjects)
    if cs.task == "reg":
        y = (y.astype(float) - info["target_mean"]) / info["target_std"]
        est, grid, scoring = Ridge(), {"alpha": PENALTIES}, "neg_mean_absolute_error"
    else:
        y = y.astype(int)
        if len(set(y.tolist())) < 2:
            raise ConfigError(f"the training cases of {cs.target!r} hold one class only: a classifier needs two")
        est = LogisticRegression(class_weight="balanced", max_iter=2000)
        grid = {"C": 1.0 / PENALTIES}  # in the order of PENALTIES
        # a test fold of a few subjects may hold one class: the loss is told every class there is
        labels = sorted(set(y.tolist()))
        scoring = make_scorer(log_loss, response_method="predict_proba", greater_is_better=False, labels=labels)
        folds = min(folds, min(len(set(groups[y == k].tolist())) for k in labels))  # subjects of the rarest class
    fit: dict[str, Any] = {"linear_fit": "closed", "rule": rule, "windows": len(y), "subjects": n_subjects}
    fit.update(features=features, columns=len(cols))
    splitter = (
        GroupKFold(max(folds, 2))
        if cs.task == "reg"
        else StratifiedGroupKFold(max(folds, 2), shuffle=True, random_state=0)
    )
    if folds >= 2 and (cs.task == "reg" or _every_fold_has_each_class(y, groups, splitter)):
        search = GridSearchCV(est, grid, cv=splitter, scoring=scoring, refit=False)
        res = search.fit(x, y, groups=groups).cv_results_
        mean, se = res["mean_test_score"], res["std_test_score"] / np.sqrt(folds)
        best = int(np.argmax(mean))
        # rule "1se": the strongest penalty whose score is within one standard error of the best (a 24-subject
        # cross-validation is noisy, and its best penalty may be a lucky weak one); "best": the best
        pick = best
        if rule == "1se":
            pick = max(np.flatnonzero(mean >= mean[best] - se[best]), key=lambda i: PENALTIES[i])
        penalty = float(PENALTIES[pick])
        est.set_params(**{"alpha": penalty} if cs.task == "reg" else {"C": 1.0 / penalty}).fit(x, y)
        fit.update(penalty=penalty, cv_score=float(mean[pick]), cv_best_penalty=float(PENALTIES[best]))
        fit.update(cv_scoring="mean absolute error" if cs.task == "reg" else "log loss", cv_folds=folds)
    else:  # too few subjects to cross-validate: the strongest penalty that still fits, stated as such
        est.set_params(**{"alpha": PENALTIES[-1]} if cs.task == "reg" else {"C": 1.0 / PENALTIES[-1]})
        est.fit(x, y)
        fit.update(penalty=float(PENALTIES[-1]), cv_score=None)
    coef, bias = np.atleast_2d(est.coef_), np.atleast_1d(est.intercept_)
    full = np.zeros((coef.shape[0], width))  # the columns the probe does not weigh keep zero weight
    full[:, cols] = coef
    coef = full
    if cs.task == "cls":  # one row per class of the head; a class no training case has is never predicted
        seen = est.classes_
        if len(seen) == 2:  # scikit-learn's one row scores the second class against the first
            coef, bias = np.concatenate([-coef / 2, coef / 2]), np.array([-bias[0] / 2, bias[0] / 2])
        full_coef, full_bias = np.zeros((cs.n_out, width)), np.full(cs.n_out, -30.0)
        full_coef[seen], full_bias[seen] = coef, bias
        coef, bias = full_coef, full_bias
    head = model.head if head is None else head
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(coef, dtype=head.weight.dtype))
        head.bias.copy_(torch.as_tensor(bias, dtype=head.bias.dtype))
    return fit


def _every_fold_has_each_class(y: np.ndarray, groups: np.ndarray, splitter: Any) -> bool:
    classes = set(y.tolist())
    try:
        return all(set(y[tr].tolist()) == classes for tr, _ in splitter.split(y, y, groups))
    except ValueError:  # scikit-learn refuses a split it cannot stratify
        return False


#: the scale zero-shot gives the pretext classifier's logit columns: the standardised features are clamped to
#: +-6, which a logit divided by this never reaches, and the head multiplies it back
ZERO_SHOT_SCALE = 1e3


def pretext_class_map(target: str, classes: list[Any], health_label: str) -> list[int]:
    """For each class of ``target`` (``classes``, in the head's order), the class of the health pretext that reads
    it: the pretext learned ``health_label``'s cases as 0 healthy, 1 patient (:func:`~neurofm.data.pretrain.
    health_target`), so ``healthy`` (1 healthy) is its reverse and another 0/1 label (1 patient) is itself."""
    if target != health_label:
        raise ConfigError(
            f"zero-shot reads the pretext classifier for the label its pretraining pool gave it, "
            f"data.health_label={health_label!r}; the target here is {target!r}"
        )
    if not set(classes) <= {0, 1}:
        raise ConfigError(f"zero-shot maps 0/1 classes to the pretext's healthy/patient; {target!r} has {classes}")
    return [health_target({target: int(v)}, health_label) for v in classes]  # as pretraining labelled such a case


@torch.no_grad()
def zero_shot_head(model: Any, cs: CaseSet, health_label: str) -> dict[str, Any]:
    """Set ``model.head`` (a linear layer reading the standardised fused features) to output the health pretext
    classifier's logits of each case as they are, each of ``cs``'s classes taking the logit of the pretext class
    that reads it (:func:`pretext_class_map`): the classifier its pretraining taught, read with no labelled case.
    The logit columns are standardised by zero mean and a fixed scale, not by any case; returns what was done."""
    d = model.backbone.feature_dims()
    if not d.pretext_logits:
        raise ConfigError(
            "zero-shot needs a model built with pretext_features whose backbone has a pooled health classifier with "
            "contrast slots (probe_features=pretext-logit)"
        )
    mapping = pretext_class_map(cs.target, list(cs.classes), health_label)
    if max(mapping) >= d.pretext_logits:
        raise ConfigError(f"the pretext classifier has {d.pretext_logits} classes; zero-shot maps to {mapping}")
    logits = model.feature_columns("pretext-logit")[: d.pretext_logits]  # the logits, then the presence flags
    head = model.head
    model.feature_mean[logits] = 0.0
    model.feature_std[logits] = ZERO_SHOT_SCALE
    head.weight.zero_()
    head.bias.zero_()
    for k, p in enumerate(mapping):
        head.weight[k, logits[p]] = ZERO_SHOT_SCALE
    return {
        "linear_fit": "zero-shot",
        "features": "pretext-logit",
        "health_label": health_label,
        "class_map": {str(v): p for v, p in zip(cs.classes, mapping, strict=True)},
        "labelled_cases_read": 0,
    }
