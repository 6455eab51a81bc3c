from __future__ import annotations

import json

import pytest

from neurofm.demo import DemoConfig, run_demo


@pytest.mark.slow
def test_demo_end_to_end_tiny(tmp_path, capsys):
    cfg = DemoConfig(
        subjects=6,
        sessions=1,
        pretrain_steps=4,
        finetune_steps=2,
        shots={"seg": 2, "cls": 3, "reg": 3},
        latent_sessions=3,
    )
    page = run_demo(tmp_path / "demo", cfg)
    said = capsys.readouterr().err
    assert "anatomy latent: cosine same subject" in said and "contrast probe" in said
    assert said.rstrip().endswith(str(page.resolve()))
    html = page.read_text()
    for title in ("Data", "Pretraining", "Latent analysis", "does pretraining help", "Timings"):
        assert title in html
    figs = tmp_path / "demo" / "figures"
    for png in ("synth_montage.png", "pretrain_curves.png", "reconstructions.png", "latent.png", "scores.png"):
        assert (figs / png).stat().st_size > 2000, png
    summary = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert {(r["task"], r["init"]) for r in summary["scores"]} == {
        (t, i) for t in ("seg", "cls", "reg") for i in ("pretrained", "scratch")
    }
    # a second run reuses every finished stage
    again = run_demo(tmp_path / "demo", cfg)
    assert again == page
