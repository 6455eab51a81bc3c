"""Which fomo25 objective disentangles? Pretrain each variant, then measure its latents and its frozen features.

For every variant (a set of ``--set`` overrides on ``fomo25-tiny``):

1. pretrain on an unlabelled pool store for ``--steps`` steps;
2. on a separate evaluation store (other subjects): the latent analysis of ``neurofm analyze``
   (centred anatomy cosine within vs across subjects, contrast probes from each latent) and the
   swap check;
3. a quick read of the frozen features: ridge regression of age and logistic regression of
   health from each session's pooled features (T1w and FLAIR), cross-validated by subject,
   against the constant predictor.

    python experiments/pretrain_variants.py --pool POOL_STORE --eval EVAL_STORE --out DIR --steps 3000 \
        [--only NAME ...]
    python experiments/pretrain_variants.py --eval EVAL_STORE --out DIR --runs RUN ...   # measure runs made elsewhere

Writes ``DIR/<variant>/`` (the run) and ``DIR/results.json`` (one row per variant, updated as they finish).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

GLOBAL = ["model.kwargs.contrast_code=global", "objective.kl_reduction=sum", "objective.swap_anatomy=other"]
# global code with film, categorical anatomy, reference swap and CALAMITI's random anatomy (the film table's recipe)
FILM_CATEGORICAL = [
    *GLOBAL,
    "model.kwargs.contrast_injection=film",
    "model.kwargs.anatomy_code=categorical",
    "objective.swap_contrast=reference",
    "objective.rec_anatomy=random",
]
# ... with centred agreement and the contrast-means term on unmasked crops: the shipped default (preset fomo25-cmeans)
CMEANS = [
    *FILM_CATEGORICAL,
    "objective.align=centred",
    "objective.w_contrast_means=100.0",
    "objective.contrast_input=clean",
]
VARIANTS = {
    # the paper's form (spatial contrast latent, plain cosine, swap from the same crop), KL averaged or summed
    "paper-klmean": [
        "model.kwargs.contrast_code=spatial",
        "objective.align=cosine",
        "objective.kl_reduction=mean",
        "objective.swap_anatomy=mean",
        "objective.swap_contrast=same",
    ],
    "paper": [
        "model.kwargs.contrast_code=spatial",
        "objective.align=cosine",
        "objective.kl_reduction=sum",
        "objective.swap_anatomy=mean",
        "objective.swap_contrast=same",
    ],
    # a global contrast code; the anatomy of one scan with the contrast code of another crop of the other
    "global-centred": [*GLOBAL, "objective.align=centred", "objective.swap_contrast=reference"],
    "global-nce": [*GLOBAL, "objective.align=dense_nce", "objective.swap_contrast=reference"],
    # ... and each scan rebuilt from its own or its partner's anatomy at random (CALAMITI)
    "global-calamiti": [
        *GLOBAL,
        "objective.align=centred",
        "objective.swap_contrast=reference",
        "objective.rec_anatomy=random",
    ],
    "global-calamiti-same": [
        *GLOBAL,
        "objective.align=centred",
        "objective.swap_contrast=same",
        "objective.rec_anatomy=random",
    ],
    # ... and an adversary removing the contrast from the anatomy latent, a contrast classifier on the code
    "global-adversary": [
        *GLOBAL,
        "objective.align=centred",
        "objective.swap_contrast=reference",
        "objective.w_adversary=0.5",
        "objective.w_contrast_id=0.5",
    ],
    "global-adversary-calamiti": [
        *GLOBAL,
        "objective.align=centred",
        "objective.swap_contrast=reference",
        "objective.rec_anatomy=random",
        "objective.w_adversary=0.5",
        "objective.w_contrast_id=0.5",
    ],
    # ... the adversary and classifier reading unmasked encodings (what the analysis and fine-tuning see)
    "global-adversary-clean": [
        *GLOBAL,
        "objective.align=centred",
        "objective.swap_contrast=reference",
        "objective.w_adversary=1.0",
        "objective.w_contrast_id=1.0",
        "objective.contrast_input=clean",
    ],
    # ... anatomy latents asked to be equal (per-channel normalised squared difference), not only parallel
    "global-mse": [*GLOBAL, "objective.align=mse", "objective.w_align=1.0", "objective.swap_contrast=reference"],
    "global-mse-calamiti": [
        *GLOBAL,
        "objective.align=mse",
        "objective.w_align=1.0",
        "objective.swap_contrast=reference",
        "objective.rec_anatomy=random",
    ],
    # ... and the crop means of the two anatomy latents asked to be equal on the scale of crop means
    "global-mse-mean": [
        *GLOBAL,
        "objective.align=mse",
        "objective.w_align=1.0",
        "objective.w_align_mean=1.0",
        "objective.swap_contrast=reference",
    ],
    "global-mse-mean10": [
        *GLOBAL,
        "objective.align=mse",
        "objective.w_align=1.0",
        "objective.w_align_mean=10.0",
        "objective.swap_contrast=reference",
    ],
    # ... and each contrast's running mean anatomy vector pulled to the mean over contrasts
    "global-mse-cmeans": [
        *GLOBAL,
        "objective.align=mse",
        "objective.w_align=1.0",
        "objective.w_contrast_means=10.0",
        "objective.swap_contrast=reference",
    ],
    # the anatomy latent as CALAMITI's categorical code (a softmax over classes per position, Gumbel-sampled)
    "paper-categorical": [
        "model.kwargs.contrast_code=spatial",
        "model.kwargs.anatomy_code=categorical",
        "objective.align=cosine",
        "objective.kl_reduction=sum",
        "objective.swap_anatomy=mean",
        "objective.swap_contrast=same",
    ],
    "global-categorical-calamiti": [
        *GLOBAL,
        "model.kwargs.anatomy_code=categorical",
        "objective.align=centred",
        "objective.swap_contrast=reference",
        "objective.rec_anatomy=random",
    ],
    # a global contrast code that scales and shifts every decoder stage (FiLM) instead of being stacked as input
    "global-film": [*GLOBAL, "model.kwargs.contrast_injection=film", "objective.swap_contrast=reference"],
    "global-film-calamiti": [
        *GLOBAL,
        "model.kwargs.contrast_injection=film",
        "objective.swap_contrast=reference",
        "objective.rec_anatomy=random",
    ],
    "global-film-categorical-calamiti": [
        *GLOBAL,
        "model.kwargs.contrast_injection=film",
        "model.kwargs.anatomy_code=categorical",
        "objective.align=centred",
        "objective.swap_contrast=reference",
        "objective.rec_anatomy=random",
    ],
    # ... and each contrast's mean anatomy vector pulled to the common one on unmasked crops (what the analysis
    # encodes), per channel or in the metric of the crop means' covariance (what a linear probe reads)
    "global-film-categorical-calamiti-cmeans-clean": [
        *GLOBAL,
        "model.kwargs.contrast_injection=film",
        "model.kwargs.anatomy_code=categorical",
        "objective.align=centred",
        "objective.swap_contrast=reference",
        "objective.rec_anatomy=random",
        "objective.w_contrast_means=10.0",
        "objective.contrast_input=clean",
    ],
    # ... at higher weights; measured with the absolute variance floor of 1e-4 the term had until 2026-12-02
    # (the categorical code's crop-mean variances, ~4e-7, sat far below it: ~250 times too weak) and, for
    # weight 100, with the relative floor after it (experiments/results_contrast_means.json, runs_2026_12_02)
    **{
        f"global-film-categorical-calamiti-cmeans{w}-clean": [
            *GLOBAL,
            "model.kwargs.contrast_injection=film",
            "model.kwargs.anatomy_code=categorical",
            "objective.align=centred",
            "objective.swap_contrast=reference",
            "objective.rec_anatomy=random",
            f"objective.w_contrast_means={w}.0",
            "objective.contrast_input=clean",
        ]
        for w in (100, 1000)
    },
    # the shipped default's recipe (fomo25-tiny-cmeans) with a contrast classifier on its contrast code (the scan's
    # BIDS suffix as the label): does the contrast latent then tell the contrast as a supervised encoder does?
    "global-film-categorical-calamiti-cmeans100-clean-cid": [*CMEANS, "objective.w_contrast_id=1.0"],
    # ... with half of the pairs made by a random intensity remapping of the first scan (objective.remap_p): the
    # anatomy latent asked to be the same under any such map (SynthSeg's domain randomisation, without labels);
    # with the contrast-means term (the shipped default's recipe) and without it (no contrast names used at all)
    "global-film-categorical-calamiti-cmeans100-clean-remap": [*CMEANS, "objective.remap_p=0.5"],
    "global-film-categorical-calamiti-remap": [*FILM_CATEGORICAL, "objective.align=centred", "objective.remap_p=0.5"],
    # ... and with the agreement made strong (align=mse at weight 5: a's and b's anatomy codes equal at every
    # position), with and without the remapped pairs
    **{
        f"global-film-categorical-calamiti-mse5{tag}": [
            *FILM_CATEGORICAL,
            "objective.align=mse",
            "objective.w_align=5.0",
            *extra,
        ]
        for tag, extra in (("", []), ("-remap", ["objective.remap_p=0.5"]))
    },
    # the shipped default's recipe with the anatomy code made hard (model.kwargs.anatomy_code=onehot): the shipped
    # model's most likely class agrees across contrasts at 97 % of positions, and a probe of its class fractions reads
    # the contrast at 0.40 where the soft probabilities give 0.83 (experiments/results_anatomy_mode.json)
    "global-film-onehot-calamiti-cmeans100-clean": [*CMEANS, "model.kwargs.anatomy_code=onehot"],
    # ... with half of the pairs remapped: with the soft code the remapped pairs raised the agreement of the mode
    # (within - across 0.10 -> 0.42 with the contrast means); does the hard code keep that?
    "global-film-onehot-calamiti-cmeans100-clean-remap": [
        *CMEANS,
        "model.kwargs.anatomy_code=onehot",
        "objective.remap_p=0.5",
    ],
    # the shipped default's recipe with an InfoNCE on the contrast codes (objective.w_contrast_nce): the two crops of a
    # scan are positives, every other crop of the batch (the session's other contrast first) a negative; no contrast
    # names. Does the contrast latent then tell the contrast as a supervised encoder does (0.95)?
    "global-film-categorical-calamiti-cmeans100-clean-cnce": [*CMEANS, "objective.w_contrast_nce=1.0"],
    "global-film-categorical-calamiti-cmeans100-clean-cnce3": [*CMEANS, "objective.w_contrast_nce=3.0"],
    # ... with the anatomy code made hard: onehot took the confidence (where the soft code hid the contrast) out of the
    # anatomy latent, the InfoNCE put the contrast into the contrast latent; do the two together meet both probe rows?
    "global-film-onehot-calamiti-cmeans100-clean-cnce3": [
        *CMEANS,
        "model.kwargs.anatomy_code=onehot",
        "objective.w_contrast_nce=3.0",
    ],
    # ... or kept soft with its logits standardised at every position (model.kwargs.anatomy_logit_norm): the soft
    # code's confidence, where the contrast hid, is then set by the temperature, while the code stays soft (the hard
    # code lost the anatomy agreement)
    "global-film-categorical-calamiti-cmeans100-clean-cnce3-lnorm": [
        *CMEANS,
        "objective.w_contrast_nce=3.0",
        "model.kwargs.anatomy_logit_norm=true",
    ],
    "global-film-categorical-calamiti-fisher-clean": [
        *GLOBAL,
        "model.kwargs.contrast_injection=film",
        "model.kwargs.anatomy_code=categorical",
        "objective.align=centred",
        "objective.swap_contrast=reference",
        "objective.rec_anatomy=random",
        "objective.w_contrast_means=2.0",
        "objective.contrast_means_metric=whitened",
        "objective.contrast_input=clean",
    ],
    # ... with a ridge so small that the term sees what a probe on standardised features sees: every direction
    "global-film-categorical-calamiti-fisher6-clean": [
        *GLOBAL,
        "model.kwargs.contrast_injection=film",
        "model.kwargs.anatomy_code=categorical",
        "objective.align=centred",
        "objective.swap_contrast=reference",
        "objective.rec_anatomy=random",
        "objective.w_contrast_means=2.0",
        "objective.contrast_means_metric=whitened",
        "objective.contrast_means_ridge=1e-6",
        "objective.contrast_input=clean",
    ],
    "global-film-calamiti-fisher6-clean": [
        *GLOBAL,
        "model.kwargs.contrast_injection=film",
        "objective.swap_contrast=reference",
        "objective.rec_anatomy=random",
        "objective.w_contrast_means=2.0",
        "objective.contrast_means_metric=whitened",
        "objective.contrast_means_ridge=1e-6",
        "objective.contrast_input=clean",
    ],
    "mae": [
        "objective.w_swap=0",
        "objective.w_kl=0",
        "objective.w_align=0",
        "objective.w_repel=0",
        "objective.variational=false",
    ],
}


def session_features(run: Path, store_root: Path, contrasts=("T1w", "FLAIR")) -> tuple[np.ndarray, list[dict]]:
    """Per session: the frozen encoder's pooled + anatomy + contrast vectors of each contrast, concatenated."""
    import torch

    from neurofm.data.sampling import window_slices
    from neurofm.models.registry import model_from_checkpoint
    from neurofm.preprocess.transforms import pad_to
    from neurofm.store import Store

    model, info = model_from_checkpoint(run)
    model.eval()
    patch = int(info["run"]["data"]["patch"])
    store = Store(store_root)
    rows, feats = [], []
    for key in store.keys:
        rec = store.record(key)
        if not all(c in rec["images"] for c in contrasts):
            continue
        vec = []
        for c in contrasts:
            arr = np.asarray(store.read(key, c), np.float32)
            arr = pad_to(arr, patch, float(arr.min()))
            x = torch.from_numpy(arr)[None, None]
            parts = []
            with torch.no_grad():
                for w in window_slices(tuple(x.shape[2:]), patch, 0.0):
                    f = model.forward_features(x[(slice(None), slice(None), *w)])
                    parts.append(torch.cat([f.pooled, f.anatomy, f.contrast], 1))
            vec.append(torch.cat(parts).mean(0).numpy())
        feats.append(np.concatenate(vec))
        rows.append({"subject": rec["subject"], **rec.get("labels", {})})
    return np.stack(feats), rows


def probes(x: np.ndarray, rows: list[dict]) -> dict:
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    groups = np.array([r["subject"] for r in rows])
    age = np.array([float(r["age"]) for r in rows])
    healthy = np.array([int(r["healthy"]) for r in rows])
    cv = GroupKFold(n_splits=5)
    reg = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 13)))
    pred = cross_val_predict(reg, x, age, groups=groups, cv=cv)
    const = np.zeros_like(age)
    for tr, te in cv.split(x, age, groups):
        const[te] = age[tr].mean()
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000))
    prob = cross_val_predict(clf, x, healthy, groups=groups, cv=cv, method="predict_proba")[:, 1]
    return {
        "age_mae": float(np.abs(pred - age).mean()),
        "age_mae_constant": float(np.abs(const - age).mean()),
        "age_r": float(np.corrcoef(pred, age)[0, 1]),
        "health_auroc": float(roc_auc_score(healthy, prob)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", type=Path)
    ap.add_argument("--runs", type=Path, nargs="*", default=[], help="measure these finished runs (no training)")
    ap.add_argument("--eval", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--set", nargs="*", default=[], dest="extra", help="overrides for every variant")
    args = ap.parse_args()

    from neurofm.analyze.embed import embed_store
    from neurofm.analyze.latent import latent_analysis, summary_table, swap_check
    from neurofm.io.checkpoint import latest_checkpoint
    from neurofm.models.registry import model_from_checkpoint
    from neurofm.store import Store
    from neurofm.tasks.pretrain import pretrain

    args.out.mkdir(parents=True, exist_ok=True)
    res_path = args.out / "results.json"
    results = json.loads(res_path.read_text()) if res_path.is_file() else {}
    if args.runs:
        todo = {run.name: (run, None) for run in args.runs}
    else:
        if args.pool is None:
            ap.error("--pool is needed to train variants")
        todo = {n: (args.out / n, s) for n, s in VARIANTS.items() if not args.only or n in args.only}
    for name, (run, sets) in todo.items():
        t0 = time.time()
        if sets is None:  # made elsewhere: its own run.json says how
            rj = json.loads((run / "run.json").read_text())
            overrides = {k: rj[k] for k in ("model", "objective", "data", "optim", "trainer")}
        else:
            overrides = [
                *sets,
                f"trainer.max_steps={args.steps}",
                f"trainer.checkpoint_every={max(100, args.steps // 4)}",
                "data.num_workers=1",
                *args.extra,
            ]
            ck = latest_checkpoint(run)
            if ck is None:
                pretrain(args.pool, run, "fomo25-tiny", overrides=overrides, progress=True)
            elif int(ck.name.split("-")[1]) < args.steps:
                pretrain(None, run, resume=True, overrides=[f"trainer.max_steps={args.steps}"], progress=True)
        t_train = time.time() - t0 if sets is not None else None
        store = Store(args.eval)
        lat = latent_analysis(embed_store(run, args.eval))
        model, info = model_from_checkpoint(run)
        swap = swap_check(model.eval(), store, store.keys, int(info["run"]["data"]["patch"]))
        x, rows = session_features(run, args.eval)
        row = {
            "overrides": overrides,
            "steps": int(latest_checkpoint(run).name.split("-")[1]),
            "train_seconds": None if t_train is None else round(t_train, 1),
            "losses": info["meta"].get("losses"),
            "latent": summary_table(lat),
            "anatomy_difference": lat.get("anatomy", {}).get("similarity", {}).get("difference"),
            "swap": swap,
            "probes": probes(x, rows),
        }
        results[name] = row
        res_path.write_text(json.dumps(results, indent=2))
        print(name, json.dumps({k: row[k] for k in ("anatomy_difference", "swap", "probes", "latent")}, indent=1))


if __name__ == "__main__":
    main()
