"""The pretrained models that ship inside the package (src/neurofm/pretrained/)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from neurofm.models.registry import model_from_checkpoint
from neurofm.pretrained import ROOT, shipped, shipped_path

SHIPPED = shipped()


def test_a_pretrained_model_ships():
    assert "fomo25-tiny-synth" in SHIPPED
    assert shipped_path("no-such-model") is None and shipped_path("../pretrained") is None


def test_the_demos_model_ships_and_its_recipe_is_a_preset(run_cli):
    """neurofm demo fine-tunes shipped models by default (one per task; SHIPPED is the label-free fallback), and
    --pretrain-steps trains SHIPPED's settings from nothing: the preset resolves to the model and objective the
    shipped weights were trained with. The health model's recipe is a preset too, and its card names its labels."""
    from dataclasses import asdict

    from neurofm.demo import RECIPE
    from neurofm.demo import SHIPPED as DEMO_MODEL
    from neurofm.train.presets import get_preset

    assert DEMO_MODEL in SHIPPED
    run = json.loads((ROOT / DEMO_MODEL / "run.json").read_text())
    recipe = get_preset(RECIPE)
    assert recipe.model.name == run["model"]["name"] and recipe.model.kwargs == run["model"]["kwargs"]
    # an objective setting added after the model was made is not in its run.json; the run used its default
    objective, defaults = asdict(recipe.objective), asdict(type(recipe.objective)(kind=recipe.objective.kind))
    assert {k: v for k, v in objective.items() if k in run["objective"]} == run["objective"]
    assert set(run["objective"]) <= set(objective)
    assert all(objective[k] == defaults[k] for k in set(objective) - set(run["objective"]))
    for part in ("data", "optim"):  # the crops, batch and optimiser too (workers are the machine's)
        mine = {k: v for k, v in asdict(getattr(recipe, part)).items() if k != "num_workers"}
        assert mine == {k: v for k, v in run[part].items() if k != "num_workers"}, part
    code, out, err = run_cli("demo", "--help")
    assert code == 0, err
    said = " ".join(out.replace("│", " ").split())  # rich's box, wrapped
    from neurofm.demo import DEFAULT_MODELS, DemoConfig

    assert f"default: seg {DEFAULT_MODELS['seg']}, cls {DEFAULT_MODELS['cls']}, reg {DEFAULT_MODELS['reg']}." in said
    health = json.loads((ROOT / DEFAULT_MODELS["cls"] / "run.json").read_text())
    assert get_preset(health["preset"]).objective.w_health > 0 and health["model"]["kwargs"]["health_pool"] > 0
    assert "weak supervision by the pool's metadata" in (ROOT / DEFAULT_MODELS["cls"] / "MODEL_CARD.md").read_text()
    # the fine-tuning budget the help states is the one the demo runs
    cfg = DemoConfig()
    steps, crops = (", ".join(f"{t} {n}" for t, n in d.items()) for d in (cfg.finetune_steps, cfg.finetune_batch))
    assert f"(default: {steps}; crops a step: {crops})." in said, said
    assert set(DEFAULT_MODELS.values()) <= set(SHIPPED)


#: what each shipped folder's model card must name: the script that makes it, and its own checks
CARD = {
    "fomo25-tiny-synth": ("scripts/make_pretrained.py", "swap check"),
    "fomo25-tiny-film": (
        "scripts/make_pretrained.py --work WORK --name fomo25-tiny-film",
        "swap check",
        "contrast_injection",
    ),
    "fomo25-tiny-cmeans": (
        "scripts/make_pretrained.py --work WORK --name fomo25-tiny-cmeans",
        "swap check",
        "w_contrast_means",
    ),
    "fomo25-tiny-cnce": (
        "scripts/make_pretrained.py --work WORK --name fomo25-tiny-cnce",
        "swap check",
        "w_contrast_nce",
    ),
    "fomo25-tiny-cmeans-health": (
        "scripts/make_pretrained.py --work WORK --name fomo25-tiny-cmeans-health",
        "swap check",
        "w_health",
        "weak supervision by the pool's health labels",
        "probe_features=pretext-logit",
    ),
    "fomo25-tiny-cshift": (
        "scripts/make_pretrained.py --work WORK --name fomo25-tiny-cshift",
        "swap check",
        "pair_shift",
        "lesion Dice",
    ),
    "fomo25-tiny-cswap": (
        "scripts/make_pretrained.py --work WORK --name fomo25-tiny-cswap",
        "swap check",
        "w_swap",
        "rule_cswap_10k",
    ),
    "neurofm-brain-extract": ("scripts/make_brain_extractor.py", "Dice against the generator's brain mask"),
}


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_model_is_small_safe_and_described(name):
    folder = ROOT / name
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20e6
    assert not [p for p in files if p.suffix in (".pt", ".pth", ".ckpt", ".pkl")]  # safetensors / ONNX, no pickle
    for p in files:  # nothing of the machine it was made on
        if p.suffix in (".json", ".md") or p.name == "last":
            text = p.read_text()
            for bad in ("/tmp/", "/work/", "/root/", "/home/"):
                assert bad not in text, f"{p.name} holds a machine path"
    card = (folder / "MODEL_CARD.md").read_text()
    assert name in CARD, f"{name}: say what its card must hold"
    for needed in ("## Data", "## Training", *CARD[name]):
        assert needed in card
    model, info = model_from_checkpoint(name)  # resolved by name, loaded from safetensors
    ck = (folder / "checkpoints" / "last").read_text().strip()
    weights = load_file(folder / "checkpoints" / ck / "model.safetensors")
    state = model.state_dict()  # dynamic-network-architectures blocks hold each tensor under two names
    assert set(weights) <= set(state) and all(torch.equal(weights[k], state[k]) for k in weights)


def test_the_brain_extractor_ships_with_its_onnx_export():
    folder = ROOT / "neurofm-brain-extract"
    meta = json.loads((folder / "export-onnx" / "neurofm-export.json").read_text())
    assert meta["task_info"]["task"] == "seg" and meta["task_info"]["target"] == "brainmask"
    assert meta["preprocessing"]["brain_extraction"] == "none"  # it sees whole heads
    assert meta["parity_max_abs_logit"] <= 1e-4
    import onnx

    graph = onnx.load(str(folder / "export-onnx" / "model.onnx"))
    described = json.loads({p.key: p.value for p in graph.metadata_props}["neurofm"])
    assert described["task_info"] == meta["task_info"]
    assert not any(bad in json.dumps(described) for bad in ("/tmp/", "/work/", "/root/", "/home/"))
    evaluation = json.loads((folder / "evaluation.json").read_text())
    assert {r["contrast"] for r in evaluation if r["method"] == "neurofm"} >= {"T1w", "T2w", "FLAIR"}


def test_the_pretrained_backbone_loads_whole():
    name = "fomo25-tiny-synth"
    folder = ROOT / name
    model, info = model_from_checkpoint(name)  # resolved by name, loaded from safetensors
    ck = (folder / "checkpoints" / "last").read_text().strip()
    weights = load_file(folder / "checkpoints" / ck / "model.safetensors")
    state = model.state_dict()  # dynamic-network-architectures blocks hold each tensor under two names
    assert set(weights) <= set(state) and all(torch.equal(weights[k], state[k]) for k in weights)
    assert len(weights) == len({t.data_ptr() for t in state.values()})  # every tensor of the model is in the file
    assert info["meta"]["step"] >= 1000 and info["preprocessing"]["spacing"] == 4.0
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.isfinite(model.eval()(x)).all()


def test_inspect_and_finetune_by_name(tiny_store, tmp_path, run_cli):
    code, out, err = run_cli("inspect", "fomo25-tiny-synth")
    assert code == 0, err
    assert "fomo25-tiny" in out and "## What `neurofm analyze` measured" in out
    # the model was pretrained at 4 mm: a store at another spacing is refused, one at 4 mm is taken
    args = ["--task", "cls", "--target", "healthy", "--from", "fomo25-tiny-synth", "--out", tmp_path / "x"]
    code, _, err = run_cli("finetune", "--data", tiny_store, *args)
    assert code == 2 and "4.0 mm" in err and "Traceback" not in err
    store4 = tmp_path / "store4"
    code, _, err = run_cli("prepare", tiny_store.parent / "bids", store4, "--spacing", "4", "--no-progress")
    assert code == 0, err
    code, _, err = run_cli(
        "finetune",
        "--data",
        store4,
        "--task",
        "cls",
        "--target",
        "healthy",
        "--from",
        "fomo25-tiny-synth",
        "--mode",
        "linear",
        "--shots",
        "4",
        "--steps",
        "2",
        "--no-tta",
        "--out",
        tmp_path / "ft",
    )
    assert code == 0, err
    summary = json.loads((tmp_path / "ft" / "summary.json").read_text())
    assert summary["splits"][0]["transferred_tensors"] > 10
    code, _, err = run_cli("inspect", "fomo25-tiny-syn")
    assert code == 2 and "models that ship: " in err and "fomo25-tiny-synth" in err.split("models that ship: ")[1]
    assert "Traceback" not in err


@pytest.mark.slow
def test_analyze_reads_the_demos_categorical_code_by_its_most_likely_class_too(store_4mm, tmp_path, run_cli):
    from neurofm.demo import SHIPPED as DEMO_MODEL

    code, out, err = run_cli(
        "analyze", DEMO_MODEL, "--data", store_4mm, "--out", tmp_path / "an", "--max-sessions", "4"
    )
    assert code == 0, err
    assert "anatomy, most likely class" in out
    lat = json.loads((tmp_path / "an" / "analysis.json").read_text())["latent"]
    soft, mode = lat["anatomy"], lat["anatomy_mode"]
    assert soft["contrast_probe"]["n"] == mode["contrast_probe"]["n"] == lat["scans"]
    assert -2 <= mode["similarity"]["difference"] <= 2 and 0 <= mode["contrast_probe"]["accuracy"] <= 1
    usage = mode["code_usage"]  # how many of its classes the code uses, printed and in the report
    assert usage["classes"] == 32 and 1 <= usage["classes_used"] <= 32 and 1.0 <= usage["perplexity"] <= 32.0
    assert f"uses {usage['classes_used']} of its 32 classes" in " ".join(out.split())
    assert f"uses {usage['classes_used']} of its 32 classes" in (tmp_path / "an" / "report.html").read_text()
    # whether the code follows the image or names places in the crop: every scan's crop moved by one cell
    places = json.loads((tmp_path / "an" / "analysis.json").read_text())["places"]
    assert places["crops"] == lat["scans"] and places["move_voxels"] == 8
    assert 0 <= places["same_tissue_low"] <= places["same_tissue"] <= places["same_tissue_high"] <= 1
    assert 0 <= places["same_place_low"] <= places["same_place"] <= places["same_place_high"] <= 1
    said = f"{places['same_tissue']:.0%} of positions keep their most likely class with the tissue"
    assert said in " ".join(out.split()) and said in (tmp_path / "an" / "report.html").read_text()


def _make_pretrained():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "make_pretrained.py"
    spec = importlib.util.spec_from_file_location("make_pretrained", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_pretrained_keeps_every_repeated_override():
    # a card writes its overrides as repeated --set flags: each one must reach the recipe, not only the last
    args = _make_pretrained().parser().parse_args(["--work", "w", "--set", "a=1", "--set", "b=2", "c=3"])
    assert args.extra == ["a=1", "b=2", "c=3"]


def test_make_pretrained_packages_a_kept_checkpoint_or_says_there_is_none(tmp_path):
    script = _make_pretrained()
    run = tmp_path / "run"
    for step in (2000, 4000):
        ck = run / "checkpoints" / f"step-{step:07d}"
        ck.mkdir(parents=True)
        (ck / "meta.json").write_text(json.dumps({"step": step}))
        (ck / "model.safetensors").write_bytes(b"")
    (run / "checkpoints" / "last").write_text("step-0004000\n")
    assert script.checkpoint_to_package(run, None).name == "step-0004000"
    assert script.checkpoint_to_package(run, 2000).name == "step-0002000"
    with pytest.raises(SystemExit, match="no checkpoint at step 3000"):
        script.checkpoint_to_package(run, 3000)
    (run / "checkpoints" / "step-0002000" / "model.safetensors").unlink()  # written only in part
    with pytest.raises(SystemExit, match="no checkpoint at step 2000"):
        script.checkpoint_to_package(run, 2000)
    args = script.parser().parse_args(["--work", "w", "--steps", "4000", "--package-step", "2000"])
    run_cfg = {"model": {"name": "m", "kwargs": {}}, "data": {"patch": 32, "batch_size": 2}, "optim": {"lr": 1e-3}}
    run_cfg["objective"] = {"kind": "fomo25"}
    args.train_minutes, args.threads = 10.0, "OMP_NUM_THREADS=2"
    card = script.model_card("m", args, run_cfg, {"step": 2000, "losses": {}}, {}, "POOL")
    assert "--steps 4000 --pool-subjects 300 --package-step 2000" in card
    assert "2000\nsteps (the checkpoint at step 2000 of a 4000-step schedule)" in card
    assert "memory layout" not in card  # a run from before runs recorded their layout
    card = script.model_card("m", args, {**run_cfg, "layout": "channels_last"}, {"step": 2000, "losses": {}}, {}, "P")
    assert "It trained in the `channels_last` memory layout" in card
    assert "adds `--set trainer.memory_format=channels_last` to follow it." in card
    assert "pretrained without labels" in card and "health labels" not in card
    health = {**run_cfg, "objective": {"kind": "fomo25", "w_health": 1.0}}  # a health pretext is named as such
    card = " ".join(script.model_card("m", args, health, {"step": 2000, "losses": {}}, {}, "P").split())
    assert "without labels" not in card and "with one label: the pool's health labels" in card


def test_a_cards_analysis_table_is_rewritten_and_nothing_else():
    script = _make_pretrained()
    card = (ROOT / "fomo25-tiny-cmeans" / "MODEL_CARD.md").read_text()
    analysis = json.loads((ROOT / "fomo25-tiny-cmeans" / "analysis.json").read_text())
    mode = {"similarity": {"difference": 0.4321}, "contrast_probe": {"accuracy": 0.1234, "chance": 0.209}}
    analysis["latent"]["anatomy_mode"] = mode
    new = script.card_with_analysis(card, analysis)
    assert "| anatomy latent's most likely class, within minus across | 0.432 |" in new
    assert "| contrast probe from the anatomy latent's most likely class (chance) | 0.123 (0.209) |" in new
    assert "classes holding" not in new  # an analysis from before the code's usage was measured
    mode["code_usage"] = {"classes": 32, "classes_used": 5, "floor": 0.01, "perplexity": 3.456, "largest_shares": [0.5]}
    rows = script.analysis_table(analysis).splitlines()
    row = "| anatomy code: classes holding ≥ 1% of positions, perplexity, largest shares | 5 of 32, 3.5, 0.50 |"
    assert rows.index(row) == rows.index(next(r for r in rows if "anatomy latent's most likely class (" in r)) + 1
    del mode["code_usage"]
    head, tail = card.split(script.ANALYSIS_HEADING)
    assert new.startswith(head + script.ANALYSIS_HEADING) and new.endswith(tail[tail.index("\n## ") :])
    assert new.count("| check | value |") == 1
    assert script.card_with_analysis(new, analysis) == new  # rewriting again changes nothing
    del analysis["latent"]["anatomy_mode"]
    old_table = script.analysis_table(analysis)
    assert script.card_with_analysis(card, analysis).count(old_table) == 1 and "most likely class" not in old_table


def test_packaging_swaps_a_finished_folder_in_whole(tmp_path, monkeypatch):
    script = _make_pretrained()
    dest, stage = tmp_path / "model", tmp_path / ".model.staging"
    (dest / "checkpoints").mkdir(parents=True)
    (dest / "run.json").write_text("old")
    (stage / "checkpoints").mkdir(parents=True)
    (stage / "run.json").write_text("new")
    script.swap_in(stage, dest)
    assert (dest / "run.json").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    # a packaging killed between its two renames leaves only dot-folders beside the models, which nothing lists
    import neurofm.pretrained as pretrained

    (tmp_path / ".model.old").mkdir()
    (tmp_path / ".model.old" / "run.json").write_text("old")
    monkeypatch.setattr(pretrained, "ROOT", tmp_path)
    assert pretrained.shipped() == ["model"]


@pytest.mark.parametrize("name", [n for n in SHIPPED if CARD.get(n, ("",))[0].startswith("scripts/make_pretrained")])
def test_a_model_cards_command_remakes_its_recipe(name):
    """The command on the card, parsed as the script parses it, asks for the recipe the weights were trained with."""
    card = (ROOT / name / "MODEL_CARD.md").read_text()
    line = next(x.strip() for x in card.splitlines() if "scripts/make_pretrained.py --work" in x)
    argv = line.split("scripts/make_pretrained.py", 1)[1].split()
    args = _make_pretrained().parser().parse_args(argv)
    assert args.name == name
    run = json.loads((ROOT / name / "run.json").read_text())
    assert run["preset"] == args.preset
    assert run["trainer"]["max_steps"] == args.steps
    from neurofm.config import split_assignment

    for item in args.extra:
        key, value = split_assignment(item)  # as the recipe reads --set: YAML, so [T1w,FLAIR] is a list
        node = run
        for part in key.split("."):
            node = node[part]
        assert node == value or str(node).lower() == str(value).lower(), f"{name}: {key}={node}, the card says {value}"


def test_a_remade_card_keeps_the_sections_written_by_hand_on_the_card_it_replaces():
    script = _make_pretrained()
    new = "# m\n\nintro\n\n## Data\nnew data\n\n## Use\nnew use\n"
    old = "# m\n\nold intro\n\n## Data\nold data\n\n## Health: how to read it\nby hand\n\n## Notes\nmore\n"
    remade = script.with_kept_sections(new, old)
    assert remade.startswith(new.rstrip("\n")) and "old data" not in remade and "old intro" not in remade
    assert remade.endswith("\n## Health: how to read it\nby hand\n\n## Notes\nmore\n")
    assert script.with_kept_sections(new, None) == new == script.with_kept_sections(new, new)
    card = (ROOT / "fomo25-tiny-cmeans-health" / "MODEL_CARD.md").read_text()
    assert "## Health: what this model is for, and how to read it" in script.sections(card)


def test_a_card_of_a_model_with_an_eraser_reads_the_anatomy_after_it_and_before_it():
    script = _make_pretrained()

    def part(acc: float, gap: float) -> dict:
        probe = {"accuracy": acc, "accuracy_low": acc - 0.05, "accuracy_high": acc + 0.05, "chance": 0.2}
        return {"similarity": {"within": gap, "across": 0.0, "difference": gap}, "contrast_probe": probe}

    lat = {"anatomy": part(0.25, 0.18), "contrast": part(0.98, 0.0)}
    plain = script.analysis_table({"latent": lat})
    assert "| contrast probe from the anatomy latent (chance) | 0.250 [0.200, 0.300] (0.200) |" in plain
    assert "eraser" not in plain
    erased = script.analysis_table({"latent": {**lat, "anatomy_raw": part(0.51, 0.17)}})
    after = "contrast probe from the anatomy latent after the eraser (chance)"
    assert f"| {after} | 0.250 [0.200, 0.300] (0.200) |" in erased
    assert "| anatomy latent after the eraser, within minus across | 0.180 |" in erased
    before = "contrast probe from the anatomy latent before the eraser (chance)"
    assert f"| {before} | 0.510 [0.460, 0.560] (0.200) |" in erased
    assert "| anatomy latent before the eraser, within minus across | 0.170 |" in erased
    assert "eraser (`neurofm erase`" not in erased  # an analysis that does not say what the eraser was
    info = {"method": "leace", "rank": 4, "channels": 32, "scans": 575, "subjects": 120}
    described = script.analysis_table({"latent": {**lat, "anatomy_raw": part(0.51, 0.17)}, "eraser": info})
    row = "| eraser (`neurofm erase`, fitted on the pretraining pool) | LEACE, 4 of 32 directions, 575 scans of 120"
    assert row in described and "; contrasts" not in described  # an eraser that did not record them
    info |= {"contrasts": {"T1w": 300, "T2w": 275}, "sites": {"site-0": 60, "site-1": 60}}
    described = script.analysis_table({"latent": {**lat, "anatomy_raw": part(0.51, 0.17)}, "eraser": info})
    assert row + " subjects; contrasts T1w, T2w; sites site-0, site-1 |" in described
    args = script.parser().parse_args(["--work", "w", "--erase"])
    assert args.erase and not script.parser().parse_args(["--work", "w"]).erase
