"""The LEACE eraser of the contrast from the anatomy vector (neurofm.analyze.eraser, `neurofm erase`)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from neurofm.analyze.eraser import ERASER, Eraser, fit_eraser, load_eraser, save_eraser, unseen, unseen_text
from neurofm.analyze.latent import RAW_ROW, contrast_probe, latent_analysis, latent_similarity, summary_table
from neurofm.errors import ConfigError

CONTRASTS = ["FLAIR", "T1w", "T2w", "PDw"]


def _scans(n_subjects: int, seed: int, offsets: np.ndarray, scales: np.ndarray) -> pd.DataFrame:
    """Scan vectors as a dual-latent model gives them: each subject's anatomy, plus an offset per contrast, plus
    noise; channels at very different scales (a categorical code's class shares vary by 1e-7 to 1e-4)."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_subjects):
        anatomy = rng.normal(size=scales.size)
        for k, name in enumerate(CONTRASTS):
            x = (anatomy + offsets[k] + 0.3 * rng.normal(size=scales.size)) * scales
            rows.append({"subject": f"sub-{seed}-{s}", "contrast": name, "v": x})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    scales = np.array([1.0, 2.0, 0.5, 1e-3, 1e-4, 3e-2, 1.0, 1e-3])
    offsets = rng.normal(scale=1.5, size=(len(CONTRASTS), scales.size))
    return _scans(60, 1, offsets, scales), _scans(30, 2, offsets, scales)


def test_the_eraser_equalises_the_contrast_means_and_blinds_a_probe_on_other_subjects(data):
    pool, other = data
    x = np.stack(pool["v"])
    eraser = fit_eraser(x, pool["contrast"].to_numpy())
    assert eraser.info["rank"] == len(CONTRASTS) - 1 and eraser.info["scans"] == len(pool)
    assert eraser.info["contrasts"] == {c: 60 for c in sorted(CONTRASTS)}
    # on the scans it was fitted on, every contrast's mean is the same, in every channel whatever its scale
    erased = eraser(x)
    means = np.stack([erased[pool["contrast"].to_numpy() == c].mean(0) for c in CONTRASTS])
    spread = np.ptp(means, axis=0) / x.std(0)
    assert spread.max() < 1e-8
    # the overall mean is kept
    assert np.allclose(erased.mean(0), x.mean(0), rtol=0, atol=1e-9 * np.abs(x).max())
    # on other subjects: the probe that read the contrast falls to chance, and the anatomy is still shared
    other = other.assign(erased=list(eraser(np.stack(other["v"]))))
    raw_probe, erased_probe = contrast_probe(other, "v"), contrast_probe(other, "erased")
    assert raw_probe["accuracy"] > 0.9
    assert erased_probe["accuracy"] < erased_probe["chance"] + 0.1
    raw_sim, erased_sim = latent_similarity(other, "v"), latent_similarity(other, "erased")
    assert erased_sim["difference"] > raw_sim["difference"] > 0
    # the contrast was 3 directions of 8: what it leaves is changed only in those
    moved = eraser(x) - x
    assert np.linalg.matrix_rank(moved / x.std(0), tol=1e-6) == len(CONTRASTS) - 1


def test_the_eraser_round_trips_through_its_file_and_refuses_what_does_not_fit(data, tmp_path):
    pool, _ = data
    x = np.stack(pool["v"])
    eraser = fit_eraser(x, pool["contrast"].to_numpy())
    eraser.info["store"] = "pool"
    path = save_eraser(eraser, tmp_path)
    assert path == tmp_path / ERASER and [p.name for p in tmp_path.iterdir()] == [ERASER]  # no temporary left
    back = load_eraser(tmp_path)
    assert isinstance(back, Eraser) and back.info == eraser.info
    assert np.array_equal(back(x), eraser(x))
    assert load_eraser(tmp_path / "none") is None
    with pytest.raises(ConfigError, match="fitted on 8 channels"):
        back(x[:, :5])
    (tmp_path / ERASER).write_bytes(b"\x00" * 40)
    with pytest.raises(ConfigError, match=str(tmp_path / ERASER)):
        load_eraser(tmp_path)
    with pytest.raises(ConfigError, match="two contrasts"):
        fit_eraser(x, ["T1w"] * len(x))
    with pytest.raises(ConfigError, match="cannot fit"):
        fit_eraser(x[:6], pool["contrast"].to_numpy()[:6])
    with pytest.raises(ConfigError, match="labels"):
        fit_eraser(x, pool["contrast"].to_numpy()[:-1])


def test_the_analysis_reads_the_vector_after_the_eraser_and_the_one_before(data):
    pool, other = data
    eraser = fit_eraser(np.stack(pool["v"]), pool["contrast"].to_numpy())
    raw = np.stack(other["v"])
    df = other.assign(
        subject_latent=list(eraser(raw)), subject_latent_raw=list(raw), contrast_latent=[np.zeros(0)] * len(other)
    )
    lat = latent_analysis(df)
    assert lat["anatomy_raw"]["contrast_probe"]["accuracy"] > 0.9
    assert lat["anatomy"]["contrast_probe"]["accuracy"] < lat["anatomy"]["contrast_probe"]["chance"] + 0.1
    rows = {r["latent"]: r for r in summary_table(lat)}
    assert rows[RAW_ROW]["contrast probe accuracy"] == lat["anatomy_raw"]["contrast_probe"]["accuracy"]


def test_unseen_names_the_contrasts_and_sites_an_eraser_was_not_fitted_on():
    info = {"contrasts": {"T1w": 10, "T2w": 10}, "sites": {"site-0": 12, "site-1": 8}}
    df = pd.DataFrame(
        {"contrast": ["T1w", "FLAIR", "T2w", "FLAIR", "PDw"], "site": ["site-0", "site-2", None, "a", "a"]}
    )
    assert unseen(info, df) == {"contrasts": ["FLAIR", "PDw"], "sites": ["a", "site-2"]}
    text = unseen_text(unseen(info, df))
    assert "contrasts FLAIR, PDw" in text and "sites a, site-2" in text
    assert unseen(info, df[df["contrast"].isin(["T1w", "T2w"]) & df["site"].isin(["site-0"])]) == {}
    assert unseen({"contrasts": info["contrasts"]}, df) == {"contrasts": ["FLAIR", "PDw"]}  # no sites recorded
    assert unseen(info, df.drop(columns="site")) == {"contrasts": ["FLAIR", "PDw"]}  # a store without site labels
    assert unseen(None, df) == {} and unseen_text({}) == ""
    from neurofm.analyze.run import eraser_text

    said = eraser_text({"scans": 40, "store": "pool", "unseen": unseen(info, df)}, {"anatomy_raw": {}})
    assert "fitted on 40 scans of pool" in said and "Warning: the eraser was not fitted on contrasts FLAIR" in said
    assert "Warning" not in eraser_text({"scans": 40}, {"anatomy_raw": {}})


@pytest.mark.slow
def test_erase_through_the_cli_then_embed_reads_the_erased_vector(store_4mm, pretrained_4mm, tmp_path, run_cli):
    from neurofm.analyze.embed import embed_store, load_embeddings
    from neurofm.io.checkpoint import resolve_checkpoint

    run = tmp_path / "run"
    shutil.copytree(pretrained_4mm, run)  # the session's run is shared: erase a copy
    code, _, err = run_cli("erase", "fomo25-tiny-cshift", "--data", store_4mm, "--no-progress")
    assert code != 0 and "read-only" in err
    code, _, err = run_cli("erase", run, "--data", store_4mm, "--max-sessions", "0", "--no-progress")
    assert code != 0 and "--max-sessions" in err
    code, _, err = run_cli("erase", run, "--data", store_4mm, "--max-sessions", "12", "--no-progress")
    assert code == 0, err
    assert "removed" in err and ERASER in err
    code, out, _ = run_cli("inspect", run)
    assert code == 0 and "eraser (neurofm erase): leace of the contrast from the anatomy vector" in out
    assert "fitted on" in out and store_4mm.name in out and "; contrasts " in out and "; sites " in out
    code, out, err = run_cli(
        "analyze", run, "--data", store_4mm, "--out", tmp_path / "an", "--max-sessions", "6", "--no-progress"
    )
    assert code == 0, err
    result = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert {"anatomy", "anatomy_raw", "contrast"} <= set(result["latent"])
    assert result["eraser"]["rank"] >= 1 and result["eraser"]["store"] == store_4mm.name
    assert RAW_ROW in out and "The model carries an eraser" in (tmp_path / "an" / "report.html").read_text()
    assert "not fitted on" not in err and "unseen" not in result["eraser"]  # judged on the scans it saw
    # an eraser fitted on fewer contrasts and sites than the scans it reads: embed says which it never saw
    folder = resolve_checkpoint(run)
    eraser = load_eraser(folder)
    seen = sorted(eraser.info["contrasts"])
    assert eraser.info["sites"] and sum(eraser.info["sites"].values()) == eraser.info["sessions"]
    narrower = {**eraser.info, "contrasts": {seen[0]: 1}, "sites": {"site-elsewhere": 1}}
    save_eraser(Eraser(eraser.centre, eraser.matrix, narrower), folder)
    code, _, err = run_cli("embed", run, "--data", store_4mm, "--out", tmp_path / "e.parquet", "--no-progress")
    assert code == 0, err
    assert "warning:" in err and f"not fitted on contrasts {', '.join(seen[1:])} and sites " in err
    df = load_embeddings(tmp_path / "e.parquet")
    before = embed_store(pretrained_4mm, store_4mm)  # the same weights without an eraser
    assert np.allclose(np.stack(df["subject_latent_raw"]), np.stack(before["subject_latent"]), atol=1e-5)
    erased = np.stack(df["subject_latent"])
    assert not np.allclose(erased, np.stack(before["subject_latent"]), atol=1e-5)
    # fitted on these very scans: every contrast's mean anatomy vector is the same
    means = np.stack([erased[df["contrast"].to_numpy() == c].mean(0) for c in sorted(set(df["contrast"]))])
    assert (np.ptp(means, axis=0) / np.stack(before["subject_latent"]).std(0).clip(1e-12)).max() < 1e-3


def test_the_demo_names_the_anatomy_rows_after_and_before_the_eraser(data):
    from neurofm.demo import _latent_text

    pool, other = data
    eraser = fit_eraser(np.stack(pool["v"]), pool["contrast"].to_numpy())
    raw = np.stack(other["v"])
    df = other.assign(subject_latent=list(eraser(raw)), contrast_latent=[np.zeros(0)] * len(other))
    plain = _latent_text(summary_table(latent_analysis(df)), {})
    assert plain.lstrip().startswith("anatomy latent: ") and "eraser" not in plain
    text = _latent_text(summary_table(latent_analysis(df.assign(subject_latent_raw=list(raw)))), {})
    lines = [line.strip() for line in text.splitlines()]
    assert lines[0].startswith("anatomy latent after the eraser: ")
    assert lines[1].startswith("anatomy latent before the eraser: ")
