from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from neurofm.errors import ConfigError


@pytest.mark.slow
def test_demo_end_to_end_tiny(tmp_path, run_cli):
    from neurofm.demo import run_jobs

    # --pretrain-steps > 0: the demo's "from nothing" path (a separate pool, pretrained here); through the CLI
    args = ["demo", "--out", tmp_path / "demo", "--subjects", "6", "--sessions", "1", "--pretrain-steps", "4"]
    args += ["--pool-subjects", "3"]
    args += ["--finetune-steps", "2", "--shots", "seg=2,cls=3,reg=3", "--seeds", "2"]
    code, _, said = run_cli(*args)
    assert code == 0, said
    page = tmp_path / "demo" / "report.html"
    assert "anatomy latent: cosine same subject" in said and "contrast probe" in said and "contrast gap" in said
    assert "swap check:" in said and "minus scratch" in said
    assert "reference: the same probe on each scan's intensity histogram" in said
    assert (
        "anatomy latent read by its most likely class: cosine same subject" in said
    )  # the default's code is categorical
    assert said.rstrip().endswith(str(page.resolve()))
    html = page.read_text()
    for title in ("Data", "Pretrained model", "Latent analysis", "does pretraining help", "Timings"):
        assert title in html
    figs = tmp_path / "demo" / "figures"
    for png in ("synth_montage.png", "pretrain_curves.png", "latent.png", "scores.png", "differences.png"):
        assert (figs / png).stat().st_size > 2000, png
    # the pool is other subjects than the demo's
    pool = {p.name for p in (tmp_path / "demo" / "pool-bids").glob("sub-*")}
    demo = {p.name for p in (tmp_path / "demo" / "bids").glob("sub-*")}
    assert len(pool) == 3 and len(demo) == 6 and not pool & demo
    summary = json.loads((tmp_path / "demo" / "demo.json").read_text())
    jobs, each = run_jobs(0)  # auto: one single-threaded run per thread (1 in the suite's 1-thread workers)
    each = each or torch.get_num_threads()
    assert summary["threads"] == each and summary["jobs"] == jobs  # the values repeat at this count
    assert f"Each run trained on {each} CPU thread(s) of " in html
    runs = list((tmp_path / "demo" / "finetune").glob("*/run.json"))
    assert len(runs) >= 16 and {json.loads(r.read_text())["threads"] for r in runs} == {each}
    assert summary["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert f"({summary['machine']['cpu_capability']} kernels" in html
    arms = {(r["task"], r["init"]) for r in summary["scores"]}
    assert arms == {
        ("seg", "pretrained full"),
        ("cls", "pretrained linear"),
        ("reg", "pretrained linear"),
        ("reg", "pretrained lp-ft"),  # age also fine-tuned in full from the probe
        ("seg", "random frozen"),
        ("cls", "random linear"),
        ("reg", "random linear"),
        *((t, a) for t in ("seg", "cls", "reg") for a in ("scratch", "constant")),
    }
    for r in summary["scores"]:
        if r["init"] != "scratch":  # every arm is paired with scratch, with an interval
            assert r["difference_low"] <= r["difference"] <= r["difference_high"]
    # a second run reuses every finished stage
    made = {p: p.stat().st_mtime_ns for p in (tmp_path / "demo").glob("*bids/participants.tsv")}
    made.update({p: p.stat().st_mtime_ns for p in runs})
    code, _, said = run_cli(*args)
    assert code == 0 and said.rstrip().endswith(str(page.resolve()))
    assert len(made) == 2 + len(runs) and all(p.stat().st_mtime_ns == t for p, t in made.items())  # none again


def test_demo_shots_are_parsed_per_task_and_bad_ones_refused(tmp_path, run_cli):
    from neurofm.demo import parse_per_task, parse_shots

    default = {"seg": 4, "cls": 16, "reg": 24}
    assert parse_shots("2", default) == {"seg": 2, "cls": 2, "reg": 2}
    assert parse_shots("seg=2, cls=8", default) == {"seg": 2, "cls": 8, "reg": 24}
    rates = parse_per_task("reg=0.001", {"seg": 1e-2, "reg": 3e-3}, float, "--lr")
    assert rates == {"seg": 1e-2, "reg": 1e-3}
    with pytest.raises(ConfigError, match="--lr takes a value"):
        parse_per_task("reg=fast", {"reg": 3e-3}, float, "--lr")
    for bad, said in (("seg=x", "TASK=VALUE pairs"), ("age=3", "unknown tasks ['age']")):
        code, _, err = run_cli("demo", "--out", tmp_path / "d", "--shots", bad)
        assert code == 2 and said in err and "Traceback" not in err
        assert not (tmp_path / "d").exists()  # refused before anything is written


def test_demo_zero_shot_row_is_on_by_default_and_off_with_its_flag(tmp_path, run_cli, monkeypatch):
    """``neurofm demo --no-zero-shot`` reaches the demo's settings (the stages themselves are the slow tests')."""
    import neurofm.demo

    seen = []
    monkeypatch.setattr(neurofm.demo, "run_demo", lambda out, cfg: seen.append(cfg))
    for flags, want in (([], True), (["--no-zero-shot"], False)):
        code, _, err = run_cli("demo", "--out", tmp_path / "d", *flags)
        assert code == 0, err
        assert seen[-1].zero_shot is want
        arms = [a.name for a in neurofm.demo.demo_arms(seen[-1], neurofm.demo.DEFAULT_MODELS["cls"], "cls")]
        assert ("pretrained zero-shot" in arms) is want


def test_demo_pretrained_per_task_and_bad_models_refused(tmp_path, run_cli):
    from neurofm.demo import DEFAULT_MODELS, SHIPPED, DemoConfig, models_by_task, models_text
    from neurofm.pretrained import shipped

    assert set(DEFAULT_MODELS.values()) <= set(shipped()) and SHIPPED in shipped()
    assert models_by_task(DemoConfig()) == DEFAULT_MODELS
    cfg = DemoConfig(pretrained={"cls": "fomo25-tiny-cnce"})  # the tasks left out keep their default
    assert models_by_task(cfg) == {**DEFAULT_MODELS, "cls": "fomo25-tiny-cnce"}
    seg = DEFAULT_MODELS["seg"]
    assert models_text(models_by_task(cfg)) == f"seg {seg}, cls fomo25-tiny-cnce, reg {DEFAULT_MODELS['reg']}"
    assert models_text(models_by_task(DemoConfig(pretrained="fomo25-tiny-cnce"))) == "fomo25-tiny-cnce"
    for bad, said in (
        ("seg=no-such-model", "no-such-model"),  # a missing model is said before any work
        ("no-such-model", "no-such-model"),
        ("age=fomo25-tiny-cnce", "--pretrained names unknown tasks ['age']"),
    ):
        code, _, err = run_cli("demo", "--out", tmp_path / "d", "--pretrained", bad)
        assert code == 2 and said in err and "Traceback" not in err, err
        assert not (tmp_path / "d").exists()


@pytest.mark.slow
def test_demo_fine_tunes_each_task_from_its_own_model(tmp_path, run_cli):
    # the default: each task from its own shipped model; every row says which it came from and each model's
    # latents are analysed
    from neurofm.demo import DEFAULT_MODELS

    out = tmp_path / "demo"
    args = ["demo", "--out", out, "--subjects", "6", "--sessions", "1", "--finetune-steps", "2", "--seeds", "1"]
    args += ["--shots", "seg=2,cls=3,reg=3", "--scratch-steps", "reg=3"]
    code, _, said = run_cli(*args)
    assert code == 0, said
    for arm, steps in (("scratch", 3), ("pretrained-lp-ft", 2), ("pretrained-linear", 2)):  # scratch's own budget
        assert json.loads((out / "finetune" / f"reg-age-{arm}-seed0" / "run.json").read_text())["steps"] == steps
    assert json.loads((out / "finetune" / "cls-healthy-scratch-seed0" / "run.json").read_text())["steps"] == 2
    # health's probes read the health model through its pretext's classifier, on tiles; scratch trains as always
    for arm, features, windows in (
        ("pretrained-linear", "pretext-logit", "tiles"),
        ("pretrained-zero-shot", "pretext-logit", "tiles"),
        ("random-linear", "pretext-logit", "tiles"),
        ("scratch", "all", "whole"),
    ):
        ran = json.loads((out / "finetune" / f"cls-healthy-{arm}-seed0" / "run.json").read_text())
        assert (ran["probe_features"], ran["probe_windows"]) == (features, windows), arm
    zero = json.loads((out / "finetune" / "cls-healthy-pretrained-zero-shot-seed0" / "summary.json").read_text())
    assert zero["splits"][0]["probe"]["labelled_cases_read"] == 0 and zero["splits"][0]["probe"]["class_map"] == {
        "0": 1,
        "1": 0,
    }  # healthy (1) is the pretext's class 0, a patient (0) its class 1
    assert f"cls: the probes read {DEFAULT_MODELS['cls']} through its health pretext's own classifier" in said
    assert f"cls: pretrained zero-shot reads {DEFAULT_MODELS['cls']}'s health pretext classifier" in said
    summary = json.loads((out / "demo.json").read_text())
    assert summary["pretrained"] == DEFAULT_MODELS and len(set(DEFAULT_MODELS.values())) == 3
    assert {(r["task"], r["model"]) for r in summary["scores"]} == set(DEFAULT_MODELS.items())
    assert set(summary["latent"]) == set(DEFAULT_MODELS.values())
    assert all(v["latent"] and v["swap"] for v in summary["latent"].values())
    for model in set(DEFAULT_MODELS.values()):  # the printed pretrained rows name their model
        assert any(f"({model})" in line and "pretrained" in line for line in said.splitlines()), model
    assert all(f"the model of {task}:" in said for task in ("seg", "cls", "reg"))
    html = (out / "report.html").read_text()
    for label in ("the model of seg", "the model of cls", "the model of reg"):
        assert f"Latent analysis — {label}" in html and f"{label}: <code>" in html
    assert "Labelled subjects seg 2, cls 3, reg 3;" in html and "{'seg'" not in html  # settings read as text
    assert "steps seg 2, cls 2, reg 2 (scratch 3) of seg 2, cls 2, reg 8 crops" in html  # and the crops per step
    # the shipped models carry their erasers: both anatomy vectors are read, and the report says which is which
    assert "anatomy latent after the eraser: cosine" in said and "anatomy latent before the eraser: cosine" in said
    assert "The model carries an eraser of the contrast from the anatomy vector" in html
    for png in ("latent.png", "latent-2.png", "latent-3.png"):
        assert (out / "figures" / png).stat().st_size > 2000, png


def test_demo_arms_start_the_pretrained_full_fine_tune_from_its_probe_only_where_asked():
    from neurofm.demo import DemoConfig, demo_arms

    cfg = DemoConfig(modes={"seg": ["full"], "reg": ["linear", "full"]}, pretrained_head_init={}, scratch_steps={})
    plain = demo_arms(cfg, "MODEL", "reg")
    assert [a.name for a in plain] == ["pretrained linear", "pretrained full", "scratch", "random linear", "constant"]
    assert all(not a.settings for a in plain)
    cfg.pretrained_head_init = {"reg": "probe", "seg": "probe"}
    arms = {a.name: a for a in demo_arms(cfg, "MODEL", "reg")}
    assert list(arms) == ["pretrained linear", "pretrained lp-ft", "scratch", "random linear", "constant"]
    assert arms["pretrained lp-ft"].settings == {"head_init": "probe"} and arms["pretrained lp-ft"].mode == "full"
    assert all(not a.settings for n, a in arms.items() if n != "pretrained lp-ft")  # scratch keeps its own start
    assert [a.name for a in demo_arms(cfg, "MODEL", "seg")][0] == "pretrained full"  # segmentation has no head


def test_the_demos_probe_read_out_is_per_task_and_reaches_its_probes_not_scratch():
    from neurofm.demo import DEFAULT_MODELS, HEALTH_READ_OUT, SHIPPED, DemoConfig, demo_arms, read_out_text

    def settings(cfg, model, task):
        return {
            a.name: {k: v for k, v in a.settings.items() if k.startswith("probe_")} for a in demo_arms(cfg, model, task)
        }

    given = {"probe_windows": "tiles", "probe_features": "stages"}
    cfg = DemoConfig(probe={"cls": given})
    cls = settings(cfg, "M", "cls")
    assert cls == {"pretrained linear": given, "scratch": {}, "random linear": given, "constant": {}}
    assert all(not s for s in settings(cfg, "M", "reg").values())  # a task left out keeps the probe's defaults
    cfg.pretrained_head_init = {"cls": "probe"}
    cfg.modes = {**cfg.modes, "cls": ["linear", "full"]}
    assert settings(cfg, "M", "cls")["pretrained lp-ft"] == given  # LP-FT starts from that probe
    # by default each model is read its own way: the health model through its pretext's classifier, for health only
    default = DemoConfig()
    health = DEFAULT_MODELS["cls"]
    assert HEALTH_READ_OUT == {"probe_windows": "tiles", "probe_features": "pretext-logit"}
    cls = settings(default, health, "cls")
    assert cls == {
        "pretrained linear": HEALTH_READ_OUT,
        "pretrained zero-shot": HEALTH_READ_OUT,  # and the classifier read as it is, with no labelled subject
        "scratch": {},
        "random linear": HEALTH_READ_OUT,
        "constant": {},
    }
    zero = next(a for a in demo_arms(default, health, "cls") if a.name == "pretrained zero-shot")
    assert (zero.source, zero.mode, zero.settings["linear_fit"]) == (health, "linear", "zero-shot")
    assert "pretrained zero-shot" not in settings(DemoConfig(zero_shot=False), health, "cls")  # --no-zero-shot
    assert all(not s for s in settings(default, health, "reg").values())  # age is not the pretext's target
    other = DemoConfig(tasks=[("seg", "lesion"), ("cls", "sex"), ("reg", "age")])
    assert all(not s for s in settings(other, health, "cls").values())  # nor is sex
    assert "pretrained zero-shot" not in settings(other, health, "cls")
    assert all(not s for s in settings(default, SHIPPED, "cls").values())  # a model without the head: the defaults
    assert "pretrained zero-shot" not in settings(default, SHIPPED, "cls")
    # probe={}: the probes' defaults (the zero-shot arm reads the classifier whatever the probes read)
    bare = settings(DemoConfig(probe={}), health, "cls")
    assert bare.pop("pretrained zero-shot") == HEALTH_READ_OUT and all(not s for s in bare.values())
    assert "health pretext's own classifier" in read_out_text(HEALTH_READ_OUT) and read_out_text({}) == ""


def test_scratch_steps_give_the_scratch_arm_alone_its_own_budget(tmp_path, run_cli):
    from neurofm.demo import DemoConfig, demo_arms, set_scratch_steps, steps_text

    cfg = DemoConfig(finetune_steps={"seg": 200, "cls": 100, "reg": 100}, scratch_steps={})
    set_scratch_steps(cfg, "reg=300,cls=100")  # cls at its other arms' steps keeps none of its own
    assert cfg.scratch_steps == {"reg": 300}
    arms = {a.name: a for a in demo_arms(cfg, "M", "reg")}
    assert arms["scratch"].settings == {"steps": 300}
    assert all("steps" not in a.settings for n, a in arms.items() if n != "scratch")  # the floors and LP-FT too
    assert all("steps" not in a.settings for a in demo_arms(cfg, "M", "cls"))
    assert steps_text(cfg) == "seg 200, cls 100, reg 100 (scratch 300)"
    set_scratch_steps(cfg, "none")
    assert cfg.scratch_steps == {} and steps_text(cfg) == "seg 200, cls 100, reg 100"
    for bad, said in (("reg=0", "1 or more"), ("age=300", "unknown tasks"), ("reg=many", "TASK=VALUE")):
        with pytest.raises(ConfigError, match=said):
            set_scratch_steps(cfg, bad)
    code, _, err = run_cli("demo", "--out", tmp_path / "d", "--scratch-steps", "reg=0")
    assert code == 2 and "--scratch-steps takes steps of 1 or more" in err and "Traceback" not in err
    assert not (tmp_path / "d").exists()


def test_demo_lp_ft_is_age_by_default_and_the_option_sets_exactly_its_tasks(tmp_path, run_cli):
    from neurofm.demo import DemoConfig, demo_arms, finetune_config, set_lp_ft

    cfg = DemoConfig()  # the default since experiments/rule_demo_lpft_arm.md: age also by LP-FT, health by its probe
    assert [a.name for a in demo_arms(cfg, "M", "reg")][:2] == ["pretrained linear", "pretrained lp-ft"]
    # since experiments/rule_scratch_300.md age's scratch trains 300 steps, LP-FT 100
    assert {a.name: a.settings.get("steps") for a in demo_arms(cfg, "M", "reg")} == {
        "pretrained linear": None,
        "pretrained lp-ft": None,
        "scratch": 300,
        "random linear": None,
        "constant": None,
    }
    assert finetune_config(cfg, "M", "reg", "age").steps == 100
    assert [a.name for a in demo_arms(cfg, "M", "cls")][:2] == ["pretrained linear", "scratch"]
    set_lp_ft(cfg, ["cls"])
    assert cfg.modes["cls"] == ["linear", "full"] and cfg.modes["reg"] == ["linear"]
    assert cfg.pretrained_head_init == {"cls": "probe"}
    set_lp_ft(cfg, ["cls", "reg"])
    set_lp_ft(cfg, ["cls", "reg"])  # twice is once
    assert cfg.modes["cls"] == ["linear", "full"] == cfg.modes["reg"]
    set_lp_ft(cfg, [])  # --lp-ft none
    assert cfg.modes["cls"] == ["linear"] == cfg.modes["reg"] and not cfg.pretrained_head_init
    code, _, err = run_cli("demo", "--out", tmp_path / "d", "--lp-ft", "seg")
    assert code == 2 and "--lp-ft takes cls and reg" in err and "Traceback" not in err
    assert not (tmp_path / "d").exists()


def test_demo_jobs_share_out_the_threads_and_auto_runs_one_single_threaded_run_per_thread(monkeypatch, run_cli):
    from neurofm import demo
    from neurofm.demo import run_jobs

    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    gib = 1024**3
    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 64 * gib // 4096}
    monkeypatch.setattr(demo.os, "sysconf", lambda name: pages[name])
    assert run_jobs(1) == (1, None)  # one after another, on this process's threads
    assert run_jobs(2) == (2, 2) and run_jobs(3) == (3, 1) and run_jobs(8) == (8, 1)
    assert run_jobs(0) == (4, 1)  # auto: one run per thread
    pages["SC_PHYS_PAGES"] = 6 * gib // 4096
    assert run_jobs(0) == (3, 1)  # ... at most one per 2 GiB of memory
    pages["SC_PHYS_PAGES"] = 1 * gib // 4096
    assert run_jobs(0) == (1, None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert run_jobs(0) == (1, None)  # one at a time on a GPU
    with pytest.raises(ConfigError, match="jobs should be 0"):
        run_jobs(-1)


def test_demo_jobs_reach_the_demo_and_its_runs_train_in_one_pool_on_the_threads_the_study_reads(
    tmp_path, run_cli, monkeypatch
):
    from neurofm import demo
    from neurofm.analyze import experiments

    seen = []
    monkeypatch.setattr(demo, "run_demo", lambda out, cfg: seen.append(cfg))
    assert run_cli("demo", "--out", tmp_path / "d", "--jobs", "3")[0] == 0 and seen[-1].jobs == 3
    assert run_cli("demo", "--out", tmp_path / "d")[0] == 0 and seen[-1].jobs == 0  # auto
    monkeypatch.undo()
    code, _, err = run_cli("demo", "--out", tmp_path / "d", "--jobs", "-1")
    assert code == 2 and "--jobs should be 0 (auto) or more" in err and "Traceback" not in err
    assert not (tmp_path / "d").exists()  # refused before anything is written
    # the demo's fine-tuning: every task's runs in one pool, then each task's study reads them on those threads
    pooled, studied = [], []
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(experiments, "train_runs", lambda *a, **k: pooled.append((a, k)))
    monkeypatch.setattr(experiments, "paired_study", lambda *a, **k: studied.append(k["threads"]) or [])
    cfg = demo.DemoConfig(jobs=2, seeds=2)
    demo.finetune_rows(cfg, demo.DEFAULT_MODELS, tmp_path / "store", tmp_path / "ft", progress=False)
    (store, runs, jobs, threads), kw = pooled[0]
    assert len(pooled) == 1 and (jobs, threads) == (2, 2) and kw["redo_stale"] and studied == [2, 2, 2]
    names = sorted(f.name for f, _ in runs)
    assert names[0] == "cls-healthy-pretrained-linear-seed0" and "reg-age-scratch-seed1" in names
    arms = sum(
        len([a for a in demo.demo_arms(cfg, m, t) if a.source != "constant"]) for t, m in demo.DEFAULT_MODELS.items()
    )
    assert len(runs) == 2 * arms and {c.seed for _, c in runs} == {0, 1}  # no constant: it trains nothing
    studied.clear()
    demo.finetune_rows(replace(cfg, jobs=1), demo.DEFAULT_MODELS, tmp_path / "store", tmp_path / "ft", progress=False)
    assert len(pooled) == 1 and studied == [None, None, None]  # --jobs 1: each study trains its own runs here
