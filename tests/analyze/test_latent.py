from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from neurofm.analyze.latent import (
    INTENSITY_ROW,
    MODE_ROW,
    code_usage,
    contrast_gap,
    contrast_probe,
    intensity_histograms,
    latent_analysis,
    latent_similarity,
    most_confused,
    summary_table,
)

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
    # the accuracy's interval over subjects: none around a perfect probe, and one holding the near-chance value
    assert from_contrast["accuracy_low"] == from_contrast["accuracy_high"] == 1.0
    assert from_anatomy["accuracy_low"] < from_anatomy["accuracy"] < from_anatomy["accuracy_high"]
    res = latent_analysis(df)
    table = summary_table(res)
    assert [r["latent"] for r in table] == ["anatomy", "contrast"]
    assert table[1]["contrast probe accuracy"] == 1.0 and table[1]["probe accuracy, 95 % interval"] == "[1.000, 1.000]"
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


def test_probe_reports_which_contrasts_it_confuses():
    # T1c shares T1w's contrast vector: the probe can only guess between the two, and says so
    df = _latents(n_subjects=20)
    t1 = df[df.contrast == "T1w"].assign(contrast="T1c")
    df = pd.concat([df, t1], ignore_index=True)
    probe = contrast_probe(df, "contrast_latent")
    conf = np.array(probe["confusion"])
    assert probe["classes"] == ["FLAIR", "T1c", "T1w", "T2w"]
    assert conf.sum() == len(df) and (conf.sum(1) == 20).all()  # rows: the true contrast
    assert conf[0, 0] == 20 and conf[3, 3] == 20  # FLAIR and T2w never mistaken
    assert probe["most_confused"]["pair"] == ["T1c", "T1w"] and probe["most_confused"]["share"] == 1.0
    assert probe["most_confused"]["errors"] == conf[1, 2] + conf[2, 1] > 0
    assert probe["accuracy"] == pytest.approx(1 - probe["most_confused"]["errors"] / len(df))
    assert most_confused(["a", "b"], np.eye(2, dtype=int) * 5) == {"pair": [], "errors": 0, "share": 0.0}
    # the errors of a 3-class matrix: a<->c 3 + 1, a<->b 2
    m = most_confused(["a", "b", "c"], np.array([[5, 2, 3], [0, 5, 0], [1, 0, 5]]))
    assert m == {"pair": ["a", "c"], "errors": 4, "share": pytest.approx(4 / 6)}


class _Store:
    """What intensity_histograms reads of a store: records and volumes."""

    def __init__(self, vols: dict[str, dict[str, np.ndarray]]):
        self.vols = vols

    def record(self, key):
        return {"subject": key.split("_")[0], "session": "ses-1", "images": list(self.vols[key])}

    def read(self, key, name):
        return self.vols[key][name]


def test_intensity_histograms_known_answers_and_the_reference_probe():
    rng = np.random.default_rng(0)
    vols = {}
    for s in range(12):
        bright = rng.normal(2.0, 1.0, (8, 8, 8))  # two contrasts with one distribution, one with another
        vols[f"sub-{s}_ses-1"] = {"T1w": bright, "T1c": rng.normal(2.0, 1.0, (8, 8, 8)), "T2w": -bright}
    ref = intensity_histograms(_Store(vols), list(vols), bins=10, lo=-5.0, hi=5.0)
    assert len(ref) == 36 and set(ref.contrast) == {"T1w", "T1c", "T2w"}
    h = np.stack(ref.intensity_histogram)
    assert np.allclose(h.sum(1), 1.0)  # open outer bins: every voxel counted, however extreme
    edge = intensity_histograms(_Store({"s_1": {"T1w": np.full((2, 2, 2), 100.0)}}), ["s_1"], bins=10)
    assert edge.intensity_histogram[0][-1] == 1.0
    t2 = np.stack(ref[ref.contrast == "T2w"].intensity_histogram)
    assert t2[:, :5].sum(1).min() > 0.9  # mostly below 0
    # the probe on these histograms tells T2w from the others and confuses the two alike ones
    df = _latents(n_subjects=12)
    df = df.assign(contrast=df.contrast.map({"T1w": "T1w", "T2w": "T1c", "FLAIR": "T2w"}))
    res = latent_analysis(df, reference=ref)
    probe = res["intensity"]["contrast_probe"]
    assert probe["most_confused"]["pair"] == ["T1c", "T1w"] and probe["most_confused"]["share"] == 1.0
    assert 0.4 < probe["accuracy"] < 0.95
    table = summary_table(res)
    assert [r["latent"] for r in table] == ["anatomy", "contrast", INTENSITY_ROW]
    assert table[2]["most confused contrasts"].startswith("T1c/T1w")
    # a stack model has one row per session (contrast "stack"): no per-contrast reference then
    assert "intensity" not in latent_analysis(df.assign(contrast="stack"), reference=ref)


def test_the_anatomy_codes_mode_is_analysed_beside_its_probabilities():
    """A soft code whose confidence follows the contrast while its most likely class follows the subject: the probe
    reads the contrast from the probabilities and not from the mode, and both rows are reported."""
    df = _latents(n_subjects=15)
    rng = np.random.default_rng(1)
    shift = {c: 2.0 * rng.normal(size=16) for c in CONTRASTS}  # a per-contrast confidence
    mode = [v.copy() for v in df["subject_latent"]]
    df["subject_latent"] = [v + shift[c] for v, c in zip(df["subject_latent"], df["contrast"], strict=True)]
    df["anatomy_mode"] = mode
    res = latent_analysis(df)
    assert res["anatomy"]["contrast_probe"]["accuracy"] > 0.9
    assert res["anatomy_mode"]["contrast_probe"]["accuracy"] < 0.6
    assert res["anatomy_mode"]["similarity"]["difference"] > 0.9
    assert [r["latent"] for r in summary_table(res)] == ["anatomy", MODE_ROW, "contrast"]
    # an empty mode (a Gaussian or a hard code) adds no row
    empty = df.assign(anatomy_mode=[np.zeros(0, np.float32)] * len(df))
    assert "anatomy_mode" not in latent_analysis(empty)


def test_code_usage_known_answers():
    # 4 scans of an 8-class code: two scans all in class 0, two split evenly between classes 1 and 2
    modes = [np.eye(8)[0], np.eye(8)[0], 0.5 * (np.eye(8)[1] + np.eye(8)[2]), 0.5 * (np.eye(8)[1] + np.eye(8)[2])]
    df = pd.DataFrame({"subject": ["a", "b", "c", "d"], "contrast": ["T1w"] * 4, "anatomy_mode": modes})
    u = code_usage(df)
    assert u["classes"] == 8 and u["classes_used"] == 3
    assert u["perplexity"] == pytest.approx(np.exp(-(0.5 * np.log(0.5) + 2 * 0.25 * np.log(0.25))))  # 2^1.5
    assert u["largest_shares"][:3] == pytest.approx([0.5, 0.25, 0.25]) and u["largest_shares"][3] == 0
    # a class under the floor is not counted as used, but still enters the perplexity
    rare = [np.r_[0.995, 0.005, np.zeros(6)]] * 4
    r = code_usage(df.assign(anatomy_mode=rare))
    assert r["classes_used"] == 1 and 1.0 < r["perplexity"] < 1.1
    assert code_usage(df.drop(columns="anatomy_mode")) == {}
    assert code_usage(df.assign(anatomy_mode=[np.zeros(0)] * 4)) == {}
    # latent_analysis carries it in the mode's entry
    full = _latents(n_subjects=6)
    full["anatomy_mode"] = [np.eye(16)[i % 3] for i in range(len(full))]  # 18 scans, 6 in each of 3 classes
    res = latent_analysis(full)
    assert res["anatomy_mode"]["code_usage"]["classes_used"] == 3
    assert res["anatomy_mode"]["code_usage"]["perplexity"] == pytest.approx(3.0)


class _TwoContrastStore:
    """Sessions whose two contrasts are known intensity maps of one anatomy: A = f, B = 5 − f."""

    MAPS = {"A": (1.0, 0.0), "B": (-1.0, 5.0)}

    def __init__(self, subjects=6, sessions=2, shape=(12, 12, 12), seed=0):
        rng = np.random.default_rng(seed)
        self.anatomy = {
            f"sub-{s}_ses-{t}": rng.random(shape).astype(np.float32) for s in range(subjects) for t in range(sessions)
        }

    def record(self, key):
        arr = self.anatomy[key]
        return {"subject": key.split("_")[0], "shape": list(arr.shape), "images": {"A": "", "B": ""}}

    def read(self, key, name, box):
        scale, offset = self.MAPS[name]
        return scale * self.anatomy[key][box] + offset


class _Oracle:
    """Reads the contrast of each reference crop and renders the other crop's anatomy in it: disentangled. Batches
    of crops, each crop read on its own (``recombine``'s contract)."""

    disentangles = True

    @staticmethod
    def _contrast(x):
        maps = [_TwoContrastStore.MAPS["A" if float(crop.mean()) < 2.5 else "B"] for crop in x]
        return (torch.tensor(m, dtype=x.dtype).view(-1, *[1] * (x.ndim - 1)) for m in zip(*maps, strict=True))

    def recombine(self, x_anatomy, x_contrast):
        (s_in, o_in), (s_out, o_out) = self._contrast(x_anatomy), self._contrast(x_contrast)
        return s_out * (x_anatomy - o_in) / s_in + o_out


class _Copier(_Oracle):
    """Ignores the contrast code: gives back the anatomy crop's own intensities."""

    def recombine(self, x_anatomy, x_contrast):
        return x_anatomy.clone()


def test_swap_check_known_answers_with_an_interval_over_subjects():
    from neurofm.analyze.latent import swap_check

    store = _TwoContrastStore()
    keys = sorted(store.anatomy)
    good = swap_check(_Oracle(), store, keys, patch=8, draws=3)
    assert good["a_nearest"] == 1.0 and good["passed"] and good["verdict"] == "passed"
    assert good["a_nearest_low"] == good["a_nearest_high"] == 1.0
    assert good["mse_to_a"] == pytest.approx(0.0, abs=1e-10)
    assert (good["sessions"], good["subjects"], good["trials"]) == (12, 6, 36)
    bad = swap_check(_Copier(), store, keys, patch=8, draws=3)
    assert bad["a_nearest"] == 0.0 and not bad["passed"] and bad["verdict"] == "failed"
    assert bad["mse_to_b"] == pytest.approx(0.0, abs=1e-10)
    with pytest.raises(ValueError, match="at least one draw"):
        swap_check(_Oracle(), store, keys, patch=8, draws=0)


class _OneAtATime:
    """A model whose recombination is run one crop at a time."""

    disentangles = True

    def __init__(self, model):
        self.model = model

    def recombine(self, x_anatomy, x_contrast):
        return torch.cat(
            [self.model.recombine(x_anatomy[i : i + 1], x_contrast[i : i + 1]) for i in range(len(x_anatomy))]
        )


def test_swap_check_batches_a_sessions_draws_without_changing_the_answer():
    from neurofm.analyze.latent import swap_check
    from neurofm.models.dual_latent import DualLatentUNet

    torch.manual_seed(0)
    model = DualLatentUNet(features=(4, 8, 16), latent=4, contrast_code="global").eval()
    store = _TwoContrastStore(subjects=3, shape=(24, 24, 24))
    keys = sorted(store.anatomy)
    batched = swap_check(model, store, keys, patch=16, draws=3, reps=200)
    single = swap_check(_OneAtATime(model), store, keys, patch=16, draws=3, reps=200)
    assert batched["trials"] == single["trials"] == 18
    for k in ("mse_to_a", "mse_to_b", "mse_to_a_ref", "mse_copy_to_a"):
        assert batched[k] == pytest.approx(single[k], rel=1e-5)
    assert {k: batched[k] for k in ("a_nearest", "a_nearest_low", "a_nearest_high", "verdict")} == {
        k: single[k] for k in ("a_nearest", "a_nearest_low", "a_nearest_high", "verdict")
    }


def test_the_swap_shares_interval_resamples_subjects_not_trials():
    from neurofm.analyze.latent import share_interval, swap_verdict

    # two subjects, one always right and one always wrong: 40 trials look certain, two subjects do not
    hits = np.array([1] * 20 + [0] * 20)
    low, high = share_interval(hits, ["sub-a"] * 20 + ["sub-b"] * 20)
    assert (low, high) == (0.0, 1.0)
    # forty subjects with the same 50/50 split: the interval narrows around one half
    low, high = share_interval(hits, [f"sub-{i}" for i in range(40)])
    assert 0.3 < low < 0.5 < high < 0.7
    assert np.isnan(share_interval(hits, ["sub-a"] * 40)[0])  # one subject: no interval
    assert swap_verdict({"passed": False, "verdict": "at the line"}).startswith("failed, at the line")
    assert swap_verdict({"passed": True, "verdict": "passed"}) == "passed"


class _ClassCode:
    """A categorical anatomy code on a grid of 4-voxel cells: ``"place"`` gives each position of the crop its own
    class whatever the image; ``"image"`` gives a position the class of the tissue at its cell's corner voxel."""

    categorical_anatomy = True
    downsampling = 4

    def __init__(self, code):
        self.code = code

    def forward_features(self, x):
        import torch
        import torch.nn.functional as F

        if self.code == "place":
            cls = torch.arange(8).view(1, 2, 2, 2).expand(len(x), 2, 2, 2)
        else:
            cls = (x[:, 0, ::4, ::4, ::4] * 7).round().long() % 8
        return SimpleNamespace(latents={"mu_s": F.one_hot(cls, 8).movedim(-1, 1).float()})


def test_place_check_tells_a_code_of_places_from_a_code_of_the_image():
    from neurofm.analyze.latent import place_check, places_text

    store = _TwoContrastStore()
    keys = sorted(store.anatomy)
    image = place_check(_ClassCode("image"), store, keys, patch=8)
    assert image["same_tissue"] == 1.0 and image["same_place"] < 0.5
    assert (image["crops"], image["subjects"], image["move_voxels"]) == (24, 6, 4)
    assert image["same_place_high"] < image["same_tissue_low"] == 1.0
    assert "follows the image" in places_text(image)
    places = place_check(_ClassCode("place"), store, keys, patch=8)
    assert places["same_place"] == 1.0 and places["same_tissue"] == 0.0
    assert "names places in the crop" in places_text(places)
    # nothing to say for a code that is not categorical, or scans too small to move a crop by a cell
    assert place_check(SimpleNamespace(downsampling=4), store, keys, patch=8) == {}
    assert place_check(_ClassCode("image"), _TwoContrastStore(shape=(10, 10, 10)), keys, patch=8) == {}
    assert places_text({}) == ""
