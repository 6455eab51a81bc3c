from __future__ import annotations

import numpy as np
import pytest

from neurofm.analyze.embed import embed_store, load_embeddings, save_embeddings
from neurofm.store import Store


@pytest.mark.slow
def test_embed_writes_both_latents_per_scan(store_4mm, pretrained_4mm, tmp_path, run_cli):
    store = Store(store_4mm)
    keys = store.keys[:2]
    df = embed_store(pretrained_4mm, store_4mm, keys=keys)
    n_scans = sum(len(store.record(k)["images"]) for k in keys)
    assert len(df) == n_scans
    assert {"key", "subject", "contrast", "site", "subject_latent", "contrast_latent"} <= set(df.columns)
    assert df["subject_latent"].iloc[0].shape == (32,) and df["contrast_latent"].iloc[0].shape == (32,)
    for suffix in (".parquet", ".csv"):
        back = load_embeddings(save_embeddings(df, tmp_path / f"e{suffix}"))
        assert np.allclose(np.stack(back["subject_latent"]), np.stack(df["subject_latent"]), atol=1e-5)
    code, _, err = run_cli(
        "embed", pretrained_4mm, "--data", store_4mm, "--out", tmp_path / "all.parquet", "--no-progress"
    )
    assert code == 0, err
    assert len(load_embeddings(tmp_path / "all.parquet")) == len(store.manifest)


def _volume(shape=(24, 20, 24), seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_a_soft_categorical_code_is_also_read_by_its_most_likely_class(tmp_path):
    import torch
    import torch.nn.functional as F

    from neurofm.analyze.embed import scan_features
    from neurofm.data.sampling import window_slices
    from neurofm.models.dual_latent import DualLatentUNet
    from neurofm.preprocess.transforms import pad_to

    torch.manual_seed(0)
    model = DualLatentUNet(features=(4, 8, 16), latent=5, anatomy_code="categorical", contrast_code="global").eval()
    vol = _volume()
    anatomy, contrast, mode = scan_features(model, vol, patch=16)
    assert anatomy.shape == contrast.shape == mode.shape == (5,)
    # the mode is the share of positions whose most likely class is each class, over every window's 4^3 positions
    x = torch.from_numpy(pad_to(vol, 16, float(vol.min())))[None, None]
    with torch.no_grad():
        classes = torch.cat(
            [
                model.forward_features(x[(slice(None), slice(None), *w)]).latents["mu_s"].argmax(1).flatten()
                for w in window_slices(tuple(x.shape[2:]), 16, 0.0)
            ]
        )
    expected = F.one_hot(classes, 5).float().mean(0).numpy()
    assert np.allclose(mode, expected, atol=1e-6) and mode.sum() == pytest.approx(1.0)
    assert np.allclose(mode * classes.numel(), np.round(mode * classes.numel()), atol=1e-3)  # counts, not scores
    assert anatomy.sum() == pytest.approx(1.0, abs=1e-5) and not np.allclose(anatomy, mode)  # probabilities differ
    # a hard code is its own mode, and a Gaussian code has none: no column to read there
    hard = DualLatentUNet(features=(4, 8, 16), latent=5, anatomy_code="onehot", contrast_code="global").eval()
    gauss = DualLatentUNet(features=(4, 8, 16), latent=5).eval()
    for other in (hard, gauss):
        assert scan_features(other, vol, patch=16)[2].shape == (0,)


def test_scan_windows_in_batches_give_the_vectors_of_one_window_at_a_time():
    import torch

    from neurofm.analyze.embed import scan_features
    from neurofm.models.dual_latent import DualLatentUNet

    torch.manual_seed(0)
    model = DualLatentUNet(features=(4, 8, 16), latent=5, anatomy_code="categorical", contrast_code="global").eval()
    vol = _volume((40, 20, 36))  # padded to 40 x 20 x 36 -> 3 x 2 x 3 = 18 windows of 16^3 at no overlap
    one = scan_features(model, vol, patch=16, batch=1)
    for batch in (4, 18, 64):  # a last batch shorter than the rest, all at once, more than there are
        for want, got in zip(one, scan_features(model, vol, patch=16, batch=batch), strict=True):
            assert got.shape == want.shape and np.allclose(got, want, atol=1e-6)
    with pytest.raises(ValueError, match="at least one window"):
        scan_features(model, vol, patch=16, batch=0)


def test_embeddings_round_trip_with_the_mode_and_old_files_still_load(tmp_path):
    import pandas as pd

    rng = np.random.default_rng(0)
    df = pd.DataFrame(
        {
            "key": ["a", "b"],
            "subject": ["sub-1", "sub-2"],
            "site": ["site-0", "site-1"],
            "contrast": ["T1w", "T2w"],
            "subject_latent": [rng.random(4).astype(np.float32) for _ in range(2)],
            "contrast_latent": [rng.random(3).astype(np.float32) for _ in range(2)],
            "anatomy_mode": [np.array([0.5, 0.25, 0.25, 0.0], np.float32), np.array([0, 0, 1, 0], np.float32)],
        }
    )
    for suffix in (".parquet", ".csv"):
        back = load_embeddings(save_embeddings(df, tmp_path / f"e{suffix}"))
        assert list(back["site"]) == ["site-0", "site-1"]  # a label column starting with a prefix letter is kept
        for col in ("subject_latent", "contrast_latent", "anatomy_mode"):
            assert np.allclose(np.stack(back[col]), np.stack(df[col]), atol=1e-6), (suffix, col)
        # a file written before the mode was read (or by a model without one) loads with empty vectors
        old = load_embeddings(save_embeddings(df.drop(columns="anatomy_mode"), tmp_path / f"old{suffix}"))
        assert all(v.shape == (0,) for v in old["anatomy_mode"])
        assert np.allclose(np.stack(old["contrast_latent"]), np.stack(df["contrast_latent"]), atol=1e-6)
