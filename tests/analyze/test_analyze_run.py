from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from neurofm.analyze.run import AnalyzeConfig, analyze, spread_sessions
from neurofm.store import Store

FT = {"steps": 2, "patch": 32, "contrasts": ["T1w", "FLAIR"], "num_workers": 0, "tta": False}


@pytest.mark.slow
def test_analyze_latents_ablation_label_efficiency_and_fomo(store_4mm, pretrained_4mm, tmp_path):
    cfg = AnalyzeConfig(
        max_sessions=4,
        compare={"mae": str(pretrained_4mm)},
        tasks=[("cls", "healthy")],
        label_efficiency=("reg", "age"),
        shots=[2, 99],  # 99: more than the store holds, left out
        fomo=True,
        train_sites=["site-0", "site-1"],
        fomo_scale=0.2,
        seeds=2,
        modes=["full"],
        finetune=FT,
    )
    res = analyze(pretrained_4mm, store_4mm, tmp_path / "an", cfg, progress=False)
    lat = res["latent"]
    assert set(lat) >= {"anatomy", "contrast", "scans", "subjects"}
    assert 0 <= lat["anatomy"]["contrast_probe"]["accuracy"] <= 1
    ref = lat["intensity"]["contrast_probe"]  # the reference probe on the scans' intensity histograms
    assert 0 <= ref["accuracy"] <= 1 and sum(map(sum, ref["confusion"])) == ref["n"] == lat["scans"]
    swap = res["swap"]  # four draws per session, the share with an interval over subjects
    assert (swap["sessions"], swap["trials"]) == (4, 16)
    assert 0 <= swap["a_nearest_low"] <= swap["a_nearest"] <= swap["a_nearest_high"] <= 1
    # every table: the arms, scratch as the reference, and the two floors
    assert [r["init"] for r in res["ablation"]] == ["recipe", "mae", "scratch", "random frozen", "constant"]
    arms = ["pretrained full", "scratch", "random frozen", "constant"]
    assert [(r["init"], r["x"]) for r in res["label_efficiency"]] == [(a, 2) for a in arms]
    for r in res["label_efficiency"]:  # paired over the two seeds, with an interval of the difference
        assert r["seeds"] == 2 and len(r["per_seed"]) == 2
        if r["init"] != "scratch":
            assert r["difference_low"] <= r["difference"] <= r["difference_high"]
            assert r["difference"] == pytest.approx(sum(r["difference_per_seed"]) / 2)
    constant = next(r for r in res["label_efficiency"] if r["init"] == "constant")
    assert constant["metric"] == "mae" and constant["value"] > 0
    fomo = {r["task_label"] for r in res["fomo"]}
    assert fomo == {"fomo-cls-infarct", "fomo-seg-lesion", "fomo-reg-age"} or any("skipped" in r for r in res["fomo"])
    # the domain-shift table: every tested arm on each test site (never a training site), ECE for cls
    shift = res["domain_shift"]
    assert bool(shift) == any("skipped" not in r for r in res["fomo"])
    assert {r["site"] for r in shift}.isdisjoint({"site-0", "site-1"})
    assert all("ece" in r for r in shift if r["task"] == "fomo-cls-infarct" and r["cases"] > 1)
    saved = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert "within_values" not in json.dumps(saved)
    page = (tmp_path / "an" / "report.html").read_text()
    for title in ("Latent analysis", "Ablation", "Label efficiency", "FOMO25 protocol"):
        assert title in page
    for png in ("latent.png", "ablation.png", "label_efficiency.png"):
        assert (tmp_path / "an" / png).stat().st_size > 2000


def test_session_budget_spans_subjects_before_repeating_one(tiny_store):
    store = Store(tiny_store)
    subjects = {k: store.record(k)["subject"] for k in store.keys}
    n_subjects = len(set(subjects.values()))
    first = spread_sessions(store, n_subjects)
    assert len({subjects[k] for k in first}) == n_subjects
    everything = spread_sessions(store, 10_000)
    assert sorted(everything) == sorted(store.keys)
    assert spread_sessions(store, 3) == first[:3]


def test_a_finished_arm_is_reused_only_with_the_settings_it_was_made_with(tmp_path):

    from neurofm.analyze.experiments import arm_rows, run_config, stale_settings
    from neurofm.errors import ConfigError
    from neurofm.train.config import FinetuneConfig
    from neurofm.utils import code_fingerprint

    cfg = FinetuneConfig(task="seg", target="lesion", source="scratch", steps=200, lr=1e-2, seed=3)
    folder = tmp_path / "seg-scratch-seed3"
    folder.mkdir()
    # what the run drew, and which code made it
    drawn = {"train_subjects": ["sub-002", "sub-007"], "test_subjects": ["sub-001"]}
    record = cfg.save(folder / "run.json", split=drawn, code=code_fingerprint(), threads=torch.get_num_threads())
    (folder / "summary.json").write_text("{}")
    assert stale_settings(folder, cfg) == []
    assert stale_settings(folder, run_config(folder)) == [] and run_config(folder).lr == 1e-2  # read back
    # the drawn subjects are not the setting that fixes them: a run asked for exactly those is another run
    assert stale_settings(folder, replace(cfg, train_subjects=["sub-007", "sub-002"])) == ["train_subjects"]
    with pytest.raises(ValueError, match="train_subjects: a setting"):
        cfg.save(tmp_path / "clash.json", train_subjects=["sub-002"])
    assert not (tmp_path / "clash.json").exists()
    assert stale_settings(folder, replace(cfg, num_workers=0, bootstrap=50)) == []  # same samples, same result
    assert stale_settings(folder, replace(cfg, lr=3e-3, seg_fg_weight=20.0)) == ["lr", "seg_fg_weight"]
    del record["seg_fg_weight"]  # a run made before the setting existed used its default
    (folder / "run.json").write_text(json.dumps(record))
    assert stale_settings(folder, cfg) == []
    assert stale_settings(folder, replace(cfg, seg_fg_weight=20.0)) == ["seg_fg_weight"]
    with pytest.raises(ConfigError, match=r"other settings \(seg_fg_weight\)"):
        arm_rows(tmp_path, folder, replace(cfg, seg_fg_weight=20.0))
    assert (folder / "summary.json").is_file()  # refused, nothing removed
    # the same settings under other code (or from before runs recorded theirs) are not the same run
    for code in ("0123456789abcdef", None):
        (folder / "run.json").write_text(json.dumps({**record, "code": code}))
        assert stale_settings(folder, cfg) == ["code"]
    with pytest.raises(ConfigError, match="made by other neurofm code"):
        arm_rows(tmp_path, folder, cfg)
    # ... nor in another memory layout (it rounds otherwise)
    for fmt in ("contiguous", "channels_last"):
        trainer = {**record["trainer"], "memory_format": fmt}
        (folder / "run.json").write_text(json.dumps({**record, "trainer": trainer}))
        assert stale_settings(folder, cfg) == ["trainer.memory_format"]
        assert stale_settings(folder, replace(cfg, trainer=replace(cfg.trainer, memory_format=fmt))) == []
    # ... nor on another number of CPU threads (sums round otherwise): the message says how to reuse it
    other = torch.get_num_threads() + 1
    (folder / "run.json").write_text(json.dumps({**record, "threads": other}))
    assert stale_settings(folder, cfg) == ["threads"]
    with pytest.raises(ConfigError, match=f"made on {other} CPU threads.*OMP_NUM_THREADS={other} reuses it"):
        arm_rows(tmp_path, folder, cfg)
    del record["threads"]  # written before runs recorded them
    (folder / "run.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="does not record them"):
        arm_rows(tmp_path, folder, cfg)
    assert (folder / "summary.json").is_file()


def test_the_code_fingerprint_follows_the_source(tmp_path, monkeypatch):
    import neurofm.utils as utils

    package = tmp_path / "neurofm"
    (package / "sub").mkdir(parents=True)
    (package / "utils.py").write_text("x = 1\n")
    (package / "sub" / "a.py").write_text("y = 2\n")
    (package / "notes.txt").write_text("not code")
    monkeypatch.setattr(utils, "__file__", str(package / "utils.py"))

    def fingerprint() -> str:
        utils.code_fingerprint.cache_clear()
        return utils.code_fingerprint()

    first = fingerprint()
    assert first == fingerprint() and len(first) == 16
    (package / "notes.txt").write_text("other notes")
    assert fingerprint() == first  # only Python source counts
    (package / "sub" / "a.py").write_text("y = 3\n")
    assert fingerprint() != first
    (package / "sub" / "a.py").write_text("y = 2\n")
    assert fingerprint() == first
    (package / "sub" / "a.py").rename(package / "sub" / "b.py")  # a moved module is other code
    assert fingerprint() != first
    utils.code_fingerprint.cache_clear()


def test_the_code_fingerprint_ignores_what_only_readers_see(tmp_path, monkeypatch):
    # comments, docstrings and line layout do not change what a run computes; every change to the code does
    import neurofm.utils as utils

    package = tmp_path / "neurofm"
    package.mkdir()
    monkeypatch.setattr(utils, "__file__", str(package / "utils.py"))
    module = package / "utils.py"

    def fingerprint(text: str) -> str:
        module.write_text(text)
        utils.code_fingerprint.cache_clear()
        return utils.code_fingerprint()

    code = '"""A module."""\n\n\ndef f(x, y=2):\n    """Add."""\n    return x + y\n\n\nclass C:\n    z = 1\n'
    base = fingerprint(code)
    same = (
        '"""The module, described otherwise."""\n# a comment\n\ndef f(x,\n      y=2):  # why\n    return x + y\n'
        '\nclass C:\n    """A class."""\n\n    z = 1\n'
    )
    assert fingerprint(same) == base
    for old, new in (
        ("y=2", "y=3"),  # a default
        ("x + y", "y + x"),  # an order
        ('    """Add."""\n    return x + y', '    return "Add."'),  # a string the code uses
        ("z = 1", "z = 1.0"),  # a type
    ):
        assert fingerprint(code.replace(old, new)) != base, new
    broken = "def f(:\n"  # a file that does not parse counts by its bytes
    assert fingerprint(broken) == fingerprint(broken) != fingerprint(broken + "# more\n")
    utils.code_fingerprint.cache_clear()


def test_a_study_names_each_run_by_its_seed_and_a_later_first_seed_reuses_it(tmp_path):
    # a replication from seed 6 must find seed 6's finished run, and never take seed 0's folder for its own
    from neurofm.analyze.experiments import Arm, arm_seed_rows, paired_study
    from neurofm.evaluate.scoring import write_predictions
    from neurofm.train.config import FinetuneConfig
    from neurofm.utils import code_fingerprint

    base = FinetuneConfig(task="reg", target="age", source="scratch", shots=4, seed=5)
    arms = [Arm("scratch", "scratch")]
    for seed, error in ((5, 2.0), (6, 3.0), (0, 9.0)):  # finished runs, as this code on this thread count made them
        run = tmp_path / f"reg-age-scratch-seed{seed}"
        run.mkdir()
        replace(base, seed=seed, bootstrap=50).save(
            run / "run.json", code=code_fingerprint(), threads=torch.get_num_threads()
        )
        cases = [
            {"fold": 0, "key": f"sub-{i}_ses-1", "subject": f"sub-{i}", "site": "site-0", "target": 50.0 + i}
            for i in range(4)
        ]
        write_predictions(run / "predictions.csv", [{**c, "prediction": c["target"] + error} for c in cases])
        (run / "summary.json").write_text("{}")
    rows = paired_study(tmp_path, tmp_path, base, arms, 2, "reg-age")  # seeds 5 and 6, read back, none trained
    assert rows[0]["per_seed"] == [2.0, 3.0]
    later = paired_study(tmp_path, tmp_path, replace(base, seed=6), arms, 1, "reg-age")
    assert later[0]["per_seed"] == [3.0]
    # the per-seed runs of one arm, as probe_pairs.py reads them: the same folders, in seed order
    runs = arm_seed_rows(tmp_path, tmp_path, base, arms[0], 2, "reg-age")  # seeds 5 and 6
    assert [float(r[0]["prediction"]) - float(r[0]["target"]) for r in runs] == [2.0, 3.0]


def _row(task: str, init: str, model: str, x: int | None = None) -> dict:
    row = {"task_label": task, "init": init, "model": model, "metric": "dice", "value": 0.5, "ci_low": 0.4}
    row.update(ci_high=0.6, difference=0.1, difference_low=0.0, difference_high=0.2, seeds=3, cases=12)
    return row if x is None else {**row, "x": x}


def test_the_score_table_names_each_tasks_model_and_counts_only_when_it_has_them():
    from neurofm.analyze.run import score_table

    one = [_row("seg-lesion", "pretrained full", "/runs/a"), _row("seg-lesion", "scratch", "/runs/a")]
    table = score_table(one)
    assert "model" not in table[0] and "labelled subjects" not in table[0]  # one model, no counts: no such columns
    other = [_row("cls-healthy", "pretrained linear", "/models/b"), _row("cls-healthy", "scratch", "/models/b")]
    per_task = [*one, *other]
    table = score_table(per_task)
    assert [r["model"] for r in table] == ["a", "", "b", ""]  # the pretrained rows name their model, by its folder
    curve = score_table([_row("seg-lesion", "pretrained full", "/runs/a", x) for x in (2, 4)])
    assert [r["labelled subjects"] for r in curve] == [2, 4] and curve[0]["95% CI"] == "[0.4, 0.6]"


def test_runs_trained_in_worker_processes_equal_runs_trained_here_and_a_failure_keeps_the_rest(
    store_4mm, tmp_path, monkeypatch
):
    from neurofm.analyze import experiments
    from neurofm.analyze.experiments import Arm, paired_study, study_runs, train_runs
    from neurofm.errors import NeurofmError
    from neurofm.evaluate.scoring import read_predictions
    from neurofm.train.config import FinetuneConfig

    base = FinetuneConfig(
        task="reg", target="age", source="scratch", arch="fomo25-tiny", shots=4, batch_size=2, seed=3, **FT
    )
    arms = [Arm("scratch", "scratch"), Arm("constant", "constant", "")]
    runs = study_runs(tmp_path / "pool", base, arms, 1, "reg-age")
    assert [(f.name, c.seed) for f, c in runs] == [("reg-age-scratch-seed3", 3)]  # the constant trains nothing
    bad = (tmp_path / "pool" / "too-many", replace(base, shots=99))
    with pytest.raises(NeurofmError, match=r"(?s)1 of 2 fine-tuning runs failed.*too-many: ConfigError: --shots"):
        train_runs(store_4mm, [bad, *runs], jobs=2, threads=1)
    (folder, cfg), here = runs[0], tmp_path / "here" / runs[0][0].name
    assert (folder / "summary.json").is_file() and not (bad[0] / "summary.json").exists()
    assert json.loads((folder / "run.json").read_text())["threads"] == 1
    # the same run trained in this process on one thread: the same predictions, to the last digit
    before = torch.get_num_threads()
    assert train_runs(store_4mm, [(here, cfg)], jobs=1, threads=1) == 1
    assert torch.get_num_threads() == before  # this process's threads are given back
    made = [r["prediction"] for r in read_predictions(folder / "predictions.csv")]
    assert made == [r["prediction"] for r in read_predictions(here / "predictions.csv")] and len(made) >= 2
    # finished on one thread: kept by another call and read by the study, nothing trained again
    assert train_runs(store_4mm, runs, jobs=2, threads=1) == 0
    trained = []
    monkeypatch.setattr(experiments, "finetune", lambda *a, **k: trained.append(a))
    rows = paired_study(store_4mm, tmp_path / "pool", base, arms, 1, "reg-age", threads=1)
    assert not trained and rows[0]["per_seed"][0] == pytest.approx(
        float(np.mean([abs(r["prediction"] - r["target"]) for r in read_predictions(here / "predictions.csv")]))
    )
