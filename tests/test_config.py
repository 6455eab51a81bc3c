"""The one config system: preset rows, precedence, validation, saving (pretraining and fine-tuning alike)."""

from __future__ import annotations

import json

import pytest

from neurofm.config import preset_row
from neurofm.errors import ConfigError
from neurofm.train.config import FinetuneConfig, Recipe
from neurofm.train.presets import PRESETS


def test_preset_rows_build_on_their_base_and_tiny_rows_keep_the_recipe():
    lam4 = Recipe.from_name("lamim4")
    lam16 = Recipe.from_name("lamim16")
    assert (lam4.objective.hole, lam4.objective.holes) == (4, 6000)
    assert lam4.data == lam16.data and lam4.optim == lam16.optim  # all else from lamim16's row
    tiny = Recipe.from_name("lamim4-tiny")
    assert tiny.preset == "lamim4-tiny" and tiny.objective.hole == 4 and tiny.data.patch == 32
    assert tiny.optim.name == "adam" and tiny.data.intensity == "minmax"  # the recipe survives the shrink
    mae = Recipe.from_name("mae-tiny")
    assert mae.objective.w_swap == 0 and mae.model.kwargs == Recipe.from_name("fomo25-tiny").model.kwargs
    assert all(Recipe.from_name(n).data.mode == Recipe.from_name(n).objective.data_mode for n in PRESETS)
    assert "help" not in preset_row(PRESETS, "ssl3d-tiny")


def test_precedence_preset_then_file_then_flags_then_set(tmp_path):
    f = tmp_path / "ft.yaml"
    f.write_text("steps: 50\nlr: 0.01\nbatch_size: 4\ntrainer:\n  devices: 2\n")
    cfg = FinetuneConfig.resolve(
        "frozen", f, ["lr=0.5"], values={"task": "cls", "target": "infarct", "source": "runs/x", "batch_size": 8}
    )
    assert cfg.mode == "frozen" and cfg.preset == "frozen"  # preset
    assert cfg.steps == 50 and cfg.trainer.devices == 2  # file
    assert cfg.batch_size == 8  # flags beat the file
    assert cfg.lr == 0.5  # --set beats everything
    j = tmp_path / "recipe.json"
    j.write_text(json.dumps({"optim": {"lr": 0.25}, "model": {"kwargs": {"latent": 16}}}))
    r = Recipe.resolve("fomo25-tiny", j, ["trainer.max_steps=7"])
    assert r.optim.lr == 0.25 and r.trainer.max_steps == 7
    assert r.model.kwargs == {"features": [8, 16, 32, 64], "latent": 16}  # a file merges into kwargs


def test_bad_settings_name_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['stepz'\]; valid: .*'steps'"):
        FinetuneConfig.resolve("full", values={"task": "seg", "target": "lesion", "stepz": 3})
    with pytest.raises(ConfigError, match="unknown fine-tuning preset|unknown preset 'fast'"):
        FinetuneConfig.resolve("fast", values={"task": "seg", "target": "lesion"})
    with pytest.raises(ConfigError, match="does not fit the ssl3d objective"):
        Recipe.from_name("ssl3d").override(["data.mode=pair"])
    (tmp_path / "bad.yaml").write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        Recipe.resolve("fomo25", tmp_path / "bad.yaml")


def test_saved_config_rebuilds_the_same_run(tmp_path):
    cfg = FinetuneConfig.resolve("linear", values={"task": "reg", "target": "age", "source": "runs/x", "shots": 5})
    written = cfg.save(tmp_path / "run.json", task_info={"target_mean": 50.0})
    back = json.loads((tmp_path / "run.json").read_text())
    assert back == written and back["task_info"] == {"target_mean": 50.0}
    assert FinetuneConfig.resolve(base={k: v for k, v in back.items() if k != "task_info"}) == cfg
    recipe = Recipe.from_name("ssl3d-tiny")
    recipe.save(tmp_path / "r.json")
    assert Recipe.from_dict(json.loads((tmp_path / "r.json").read_text())) == recipe
