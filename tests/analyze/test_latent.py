from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from neurofm.analyze.latent import contrast_gap, contrast_probe, latent_analysis, latent_similarity, summary_table

CONTRASTS = ["T1w", "T2w", "FLAIR"]


def _latents(n_subjects=12, dim=16, noise=0.1, seed=0):
    """Subject latents = a subject's own vector (+ noise); contrast latents = the contrast's vector (+ noise)."""
    rng = np.random.default_rng(seed)
    subj_vec = rng.normal(size=(n_subjects, dim))
    con_vec = {c: rng.normal(size=dim) for c in CONTRASTS}
    rows = []
    for s in range(n_subjects):
        for c in CONTRASTS:
            rows.append(
                {
                    "subject": f"sub-{s}",
                    "contrast": c,
                    "subject_latent": subj_vec[s] + noise * rng.normal(size=dim) + 5.0,  # a shared offset
                    "contrast_latent": con_vec[c] + noise * rng.normal(size=dim),
                }
            )
    return pd.DataFrame(rows)


def test_similarity_known_answer():
    df = _latents()
    sim = latent_similarity(df, "subject_latent")
    # centred: same subject ~ cos(v, v) = 1 (noise 0.1 over norm ~4), different subjects ~ 0 on average
    assert sim["within"] > 0.95
    assert abs(sim["across"]) < 0.15
    assert sim["n_within"] == 12 * 3  # 3 cross-contrast pairs per subject
    assert sim["n_across"] == (36 * 35) // 2 - 12 * 3
    con = latent_similarity(df, "contrast_latent")
    assert con["within"] < 0.2  # contrast latents of one subject differ across contrasts


def test_similarity_of_identical_and_orthogonal_vectors():
    e = np.eye(4)
    df = pd.DataFrame(
        {
            "subject": ["a", "a", "b", "b"],
            "contrast": ["T1w", "T2w", "T1w", "T2w"],
            "subject_latent": [e[0] + e[2], e[0] + e[2], e[1] + e[3], e[1] + e[3]],
        }
    )
    sim = latent_similarity(df, "subject_latent")
    # after centring, subject a = (+.5, -.5, +.5, -.5), subject b its negative: cos +1 within, -1 across
    assert sim["within"] == pytest.approx(1.0) and sim["across"] == pytest.approx(-1.0)


def test_contrast_gap_known_answers():
    rng = np.random.default_rng(0)
    n, dim = 200, 8
    subj = rng.normal(size=(n, dim))
    rows = []
    for k, shift in (("same", 0.0), ("offset", 1.0)):
        for s in range(n):
            for c, sign in (("T1w", 0.0), ("FLAIR", 1.0)):
                rows.append({"subject": f"{k}{s}", "contrast": c, "v": subj[s] + sign * shift, "kind": k})
    df = pd.DataFrame(rows)
    assert contrast_gap(df[df.kind == "same"], "v")["gap"] == pytest.approx(0.0, abs=1e-12)
    offset = contrast_gap(df[df.kind == "offset"], "v")
    # a unit offset in every feature over features of variance 1 + 1/4: 1 / 1.25 per feature
    assert offset["gap"] == pytest.approx(1 / 1.25, rel=0.1) and offset["pairs"] == n
    unrelated = pd.DataFrame(
        [{"subject": f"s{s}", "contrast": c, "v": rng.normal(size=dim)} for s in range(n) for c in ("T1w", "T2w")]
    )
    assert contrast_gap(unrelated, "v")["gap"] == pytest.approx(2.0, rel=0.1)
    # pairs are taken within a session when the table has sessions: another session's scan is no pair
    two = df[df.kind == "same"].assign(session=lambda d: np.where(d.contrast == "T1w", "ses-1", "ses-2"))
    assert contrast_gap(two, "v") == {}
    res = latent_analysis(_latents())
    assert res["anatomy"]["contrast_gap"]["gap"] < 0.1 < 1.0 < res["contrast"]["contrast_gap"]["gap"]


def test_probes_find_contrast_only_in_the_contrast_latent():
    df = _latents(n_subjects=15)
    from_contrast = contrast_probe(df, "contrast_latent")
    from_anatomy = contrast_probe(df, "subject_latent")
    assert from_contrast["accuracy"] == 1.0
    assert from_contrast["chance"] == pytest.approx(1 / 3)
    assert from_anatomy["accuracy"] < 0.6  # near chance: anatomy carries no contrast information here
    res = latent_analysis(df)
    table = summary_table(res)
    assert [r["latent"] for r in table] == ["anatomy", "contrast"]
    assert table[1]["contrast probe accuracy"] == 1.0
    assert table[0]["contrast gap (0 same, 2 unrelated)"] < 0.1 < 1.0 < table[1]["contrast gap (0 same, 2 unrelated)"]


def test_probe_never_sees_a_test_subject_in_training():
    # labels that are a pure function of the subject (memorisable) but unrelated to the features:
    # with subject-grouped folds the probe cannot exceed chance by memorising subjects
    rng = np.random.default_rng(1)
    rows = []
    for s in range(20):
        feat = rng.normal(size=8)
        for _ in range(3):
            rows.append({"subject": f"s{s}", "contrast": "A" if s % 2 else "B", "x": feat + 0.01 * rng.normal(size=8)})
    res = contrast_probe(pd.DataFrame(rows), "x")
    assert res["accuracy"] < 0.8


def test_probe_with_one_subject_is_empty_not_an_error():
    # grouped CV needs two subjects; one subject's scans give no held-out split
    rows = [{"subject": "s0", "contrast": c, "x": np.full(4, float(k))} for k, c in enumerate("ABAB")]
    assert contrast_probe(pd.DataFrame(rows), "x") == {}
