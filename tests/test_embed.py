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
