from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from neurofm.data.finetune import Case, build_cases, few_shot, k_folds
from neurofm.data.pretrain import contrast_id
from neurofm.errors import ConfigError
from neurofm.models.downstream import DownstreamModel, adapt_stem, load_pretrained
from neurofm.models.registry import create_model, model_from_checkpoint
from neurofm.store import Store
from neurofm.tasks.finetune import finetune
from neurofm.train.config import FinetuneConfig

FAST = {"steps": 6, "patch": 32, "num_workers": 0, "bootstrap": 50, "tta": False}


def _cases(n_subjects, sessions=1, classes=2):
    return [
        Case(f"s{i}_{k}", f"s{i}", f"ses-{k}", ["T1w"], i % classes) for i in range(n_subjects) for k in range(sessions)
    ]


def test_few_shot_is_reproducible_nested_and_stratified():
    cases = _cases(20, sessions=2)
    a_train, a_test = few_shot(cases, 4, seed=3)
    b_train, _ = few_shot(cases, 4, seed=3)
    assert [c.key for c in a_train] == [c.key for c in b_train]
    subj = {c.subject for c in a_train}
    assert len(subj) == 4 and not subj & {c.subject for c in a_test}
    assert {c.target for c in a_train} == {0, 1}  # one of each class at least
    bigger, _ = few_shot(cases, 8, seed=3)
    assert subj <= {c.subject for c in bigger}  # nested subsets for label-efficiency curves
    assert {c.subject for c in few_shot(cases, 4, seed=4)[0]} != subj
    with pytest.raises(ConfigError, match="shots"):
        few_shot(cases, 20)


def test_k_folds_partition_subjects():
    cases = _cases(10, sessions=2)
    folds = k_folds(cases, 5, seed=0)
    tests = [{c.subject for c in te} for _, te in folds]
    assert set().union(*tests) == {c.subject for c in cases}
    assert sum(len(t) for t in tests) == 10
    for tr, te in folds:
        assert not {c.subject for c in tr} & {c.subject for c in te}
        assert {c.target for c in te} == {0, 1}  # stratified


def test_build_cases_from_the_store(tiny_store):
    store = Store(tiny_store)
    seg = build_cases(store, "seg", "lesion", ["T1w", "FLAIR"])
    assert seg.classes == [0, 1] and len(seg.cases) == 12
    cls = build_cases(store, "cls", "diagnosis")
    assert cls.classes == sorted({r["labels"]["diagnosis"] for r in store.records.values()})
    reg = build_cases(store, "reg", "age")
    assert all(isinstance(c.target, float) for c in reg.cases)
    with pytest.raises(ConfigError, match="not in the store"):
        build_cases(store, "seg", "lesion", ["DWI"])
    with pytest.raises(ConfigError, match="not a number"):
        build_cases(store, "reg", "diagnosis")


@pytest.mark.parametrize("backbone", ["dual_latent_unet", "resenc_unet", "primus"])
@pytest.mark.parametrize("task", ["seg", "cls"])
def test_missing_contrast_never_influences_the_output(backbone, task):
    kw = {
        "dual_latent_unet": {"features": [4, 8, 16], "latent": 6},
        "resenc_unet": {"features": [4, 8, 16], "blocks": [1, 1, 1]},
        "primus": {"size": "tiny", "img_size": 16},
    }
    torch.manual_seed(0)
    model = DownstreamModel({"name": backbone, "kwargs": kw[backbone]}, task, 2, ["T1w", "FLAIR"]).eval()
    x1 = torch.randn(2, 2, 16, 16, 16)
    x2 = x1.clone()
    x2[:, 1] = torch.randn(2, 16, 16, 16) * 10  # other content in the missing FLAIR channel
    present = torch.tensor([[True, False], [True, False]])
    with torch.no_grad():
        assert torch.allclose(model(x1, present), model(x2, present), atol=1e-5)
        both = model(x1, torch.ones(2, 2, dtype=torch.bool))
    assert not torch.allclose(both, model(x1, present))  # a present contrast does count
    with pytest.raises(ValueError, match="at least one present"):
        model(x1, torch.zeros(2, 2, dtype=torch.bool))


def test_learned_pooling_reads_the_anatomy_latent_and_can_take_the_maximum():
    torch.manual_seed(0)
    bb = {"name": "dual_latent_unet", "kwargs": {"features": [4, 8, 16], "latent": 6}}
    plain = DownstreamModel(bb, "cls", 2, ["T1w"], mode="frozen", pool_channels=5)
    model = DownstreamModel(bb, "cls", 2, ["T1w"], mode="frozen", pool_channels=5, pool="meanmax", pool_latent=True)
    assert len(plain.pool) == 3 and len(model.pool) == 4  # three encoder maps, and the anatomy latent map
    assert model.pool[-1][0].in_channels == 6
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        pooled = model._learned_pool(model.backbone.forward_features(x))
    assert pooled.shape == (2, 4 * 2 * 5)
    per_map = pooled.view(2, 4, 2, 5)  # (case, map, [mean, max], channel)
    assert (per_map[:, :, 1] >= per_map[:, :, 0]).all()  # the maximum is never below the mean
    assert model(x.expand(-1, 1, -1, -1, -1)).shape == (2, 2)
    with pytest.raises(ConfigError, match="pool"):
        DownstreamModel(bb, "cls", 2, ["T1w"], pool="median")
    with pytest.raises(ConfigError, match="head-pool"):
        FinetuneConfig(task="cls", target="x", head_pool="median")


def test_probe_feature_columns_are_each_contrasts_stage_means_and_the_presence_flags():
    """``probe_features=stages``: the columns of the fused vector that hold the encoder's stage means of each contrast
    (in the model's contrast order) and the presence flags, not the anatomy or contrast latents."""
    torch.manual_seed(0)
    bb = {"name": "dual_latent_unet", "kwargs": {"features": [4, 8, 16], "latent": 6}}
    model = DownstreamModel(bb, "cls", 2, ["T1w", "FLAIR"], mode="linear").eval()
    x, present = torch.randn(3, 2, 16, 16, 16), torch.tensor([[1, 1], [1, 0], [1, 1]])
    with torch.no_grad():
        fused = model.features(x, present)
        per_scan = [model.backbone.forward_features(x[:, i : i + 1]).pooled for i in range(2)]
    want = torch.cat([per_scan[0], per_scan[1] * present[:, 1:], present.float()], dim=1)  # a missing scan: zeros
    cols = model.feature_columns("stages")
    assert torch.allclose(fused[:, cols], want, atol=1e-6)
    assert len(cols) == 2 * model.backbone.feature_dims().pooled + 2 < fused.shape[1]  # the latents are left out
    assert torch.equal(model.feature_columns("all"), torch.arange(fused.shape[1]))
    with pytest.raises(ConfigError, match="stages"):
        model.feature_columns("latents")
    with pytest.raises(ConfigError, match="probe_windows"):
        FinetuneConfig(task="cls", target="x", mode="linear", source="random", probe_windows="crops")
    with pytest.raises(ConfigError, match="probe_features"):
        FinetuneConfig(task="cls", target="x", mode="linear", source="random", probe_features="latents")


HEALTH_KW = {"features": [4, 8, 16], "latent": 6, "health_classes": 2, "health_pool": 3, "health_norm": True,
             "health_slots": True}  # fmt: skip


def test_pretext_features_are_the_pretrained_health_heads_pooling_of_each_contrast():
    """``probe_features=pretext``: the model keeps the pretrained health head with its pretrained weights, and the
    fused vector holds each present scan's pooled vector, in its contrast's place, beside the stage means, then the
    head's classifier's logits of the case, as pretraining read a pair (a one-scan case as that scan twice); the
    pretext columns are the pooled vectors and the flags, the pretext-logit columns the logits and the flags; reading
    features in training mode leaves the head's standardisation as pretraining left it."""
    torch.manual_seed(0)
    pre = create_model("dual_latent_unet", **HEALTH_KW).eval()
    bb = {"name": "dual_latent_unet", "kwargs": HEALTH_KW}
    model = DownstreamModel(bb, "cls", 2, ["T1w", "FLAIR"], mode="linear", pretext_features=True)
    report = load_pretrained(model, pre.state_dict(), None)
    kept = {k for k in model.state_dict() if "health_head" in k}
    assert kept == {f"backbone.{k}" for k in pre.state_dict() if k.startswith("health_head.")}
    assert report["initialised"] == []  # every kept tensor came from the pretrained run
    with torch.no_grad():  # standardisation statistics that are not the identity, as a trained head's are
        pre.health_head.norm.mean.normal_()
        pre.health_head.norm.var.uniform_(0.5, 2.0)
    load_pretrained(model, pre.state_dict(), None)
    model.train()
    model.features(torch.randn(2, 2, 16, 16, 16), torch.ones(2, 2, dtype=torch.bool))
    assert torch.equal(model.backbone.health_head.norm.mean, pre.health_head.norm.mean)  # never updated downstream
    model.eval()
    x, present = torch.randn(3, 2, 16, 16, 16), torch.tensor([[1, 1], [1, 0], [1, 1]])
    with torch.no_grad():
        fused = model.features(x, present)
        scans = [pre.forward_features(x[:, i : i + 1]) for i in range(2)]
        pooled = [pre.health_head.pooled(f.maps) for f in scans]
    cols, stages = model.feature_columns("pretext"), model.feature_columns("stages")
    want = torch.cat([pooled[0], pooled[1] * present[:, 1:], present.float()], dim=1)  # a missing scan: zeros
    assert torch.allclose(fused[:, cols], want, atol=1e-6)
    want_stages = torch.cat([scans[0].pooled, scans[1].pooled * present[:, 1:], present.float()], dim=1)
    assert torch.allclose(fused[:, stages], want_stages, atol=1e-6)
    assert len(cols) == 2 * 3 * 3 + 2 and not set(cols[:-2].tolist()) & set(stages.tolist())
    assert fused.shape[1] == len(model.feature_columns("all")) == model.head.in_features
    with torch.no_grad():  # the pretext classifier on each case's scans as a pretraining pair
        ids = {c: torch.tensor([contrast_id(c)]) for c in ("T1w", "FLAIR")}
        logits = []
        for b in range(3):
            pair = [x[b : b + 1, 0:1], x[b : b + 1, 1:2] if present[b, 1] else x[b : b + 1, 0:1]]
            pair_ids = torch.cat([ids["T1w"], ids["FLAIR"] if present[b, 1] else ids["T1w"]])
            logits.append(pre.health_logits(pre.forward_features(torch.cat(pair)), 2, pair_ids))
    logit_cols = model.feature_columns("pretext-logit")
    assert len(logit_cols) == 2 + 2
    assert torch.allclose(fused[:, logit_cols], torch.cat([torch.cat(logits), present.float()], dim=1), atol=1e-5)
    # without the switch the model drops the head and has no pretext columns
    plain = DownstreamModel(bb, "cls", 2, ["T1w", "FLAIR"], mode="linear")
    assert not any("health_head" in k for k in plain.state_dict())
    assert plain.head.in_features == fused.shape[1] - 2 * 3 * 3 - 2
    for kind in ("pretext", "pretext-logit"):
        with pytest.raises(ConfigError, match="pretext_features"):
            plain.feature_columns(kind)
    for kwargs in ({"features": [4, 8, 16], "latent": 6}, {**HEALTH_KW, "health_pool": 0}):  # no pooled health head
        with pytest.raises(ConfigError, match="health_pool"):
            DownstreamModel({"name": "dual_latent_unet", "kwargs": kwargs}, "cls", 2, ["T1w"], pretext_features=True)
    with pytest.raises(ConfigError, match="segmentation"):
        DownstreamModel(bb, "seg", 2, ["T1w"], mode="frozen", pretext_features=True)
    with pytest.raises(ConfigError, match="pretext"):
        FinetuneConfig(task="seg", target="x", probe_features="pretext")


def test_zero_shot_head_outputs_the_pretext_classifiers_logits_mapped_to_the_targets_classes():
    """``linear_fit=zero-shot``: the head outputs the pooled health classifier's logits of each case as they are, even
    where they exceed the standardisation's clamp, for ``healthy`` (1 healthy) reversed from the pretext's classes
    (1 patient) and for another 0/1 label that is the run's ``health_label`` unchanged; a target other than that
    label, classes other than 0/1, a model without the classifier, and settings that cannot read it are refused."""
    from neurofm.data.finetune import CaseSet
    from neurofm.tasks.probe import zero_shot_head

    torch.manual_seed(0)
    pre = create_model("dual_latent_unet", **HEALTH_KW).eval()
    with torch.no_grad():  # logits far beyond the clamp of +-6 standardised units
        pre.health_head.out.weight.mul_(400.0)
    bb = {"name": "dual_latent_unet", "kwargs": HEALTH_KW}
    x, present = torch.randn(3, 2, 16, 16, 16), torch.tensor([[1, 1], [1, 0], [1, 1]])
    for target, label, order in (("healthy", "healthy", [1, 0]), ("patient", "patient", [0, 1])):
        model = DownstreamModel(bb, "cls", 2, ["T1w", "FLAIR"], mode="linear", pretext_features=True)
        load_pretrained(model, pre.state_dict(), None)
        model.eval()
        done = zero_shot_head(model, CaseSet([], "cls", target, ["T1w", "FLAIR"], [0, 1]), label)
        assert done["labelled_cases_read"] == 0 and done["class_map"] == {"0": order[0], "1": order[1]}
        with torch.no_grad():
            pretext = model.features(x, present)[:, model.feature_columns("pretext-logit")[:2]]
            out = model(x, present)
        assert pretext.abs().max() > 6 * 5  # a clamp at 6 standardised units would have cut these
        assert torch.allclose(out, pretext[:, order], rtol=1e-5, atol=1e-4)
    cs = CaseSet([], "cls", "healthy", ["T1w", "FLAIR"], [0, 1])
    with pytest.raises(ConfigError, match="health_label='diagnosis_binary'"):
        zero_shot_head(model, cs, "diagnosis_binary")
    with pytest.raises(ConfigError, match="0/1"):
        zero_shot_head(model, CaseSet([], "cls", "grade", ["T1w"], [0, 1, 2]), "grade")
    plain = DownstreamModel({"name": "dual_latent_unet", "kwargs": {**HEALTH_KW, "health_slots": False}}, "cls", 2,
                            ["T1w", "FLAIR"], mode="linear", pretext_features=True)  # fmt: skip
    with pytest.raises(ConfigError, match="contrast slots"):
        zero_shot_head(plain, cs, "healthy")
    for bad in ({"task": "reg"}, {"mode": "frozen"}, {"probe_features": "pretext"}, {"source": "random"},
                {"calibration": 0.25}):  # fmt: skip
        settings = {"task": "cls", "target": "healthy", "source": "run", "mode": "linear", "linear_fit": "zero-shot",
                    "probe_features": "pretext-logit", **bad}  # fmt: skip
        with pytest.raises(ConfigError, match="zero-shot"):
            FinetuneConfig(**settings)


@pytest.mark.parametrize("task", ["cls", "seg"])
def test_a_trunk_from_scratch_draws_the_same_weights_whatever_pretext_heads_its_architecture_trained(task):
    """Scratch and the random encoder take a pretrained run's architecture: a pretext head that the trunk drops
    must not move the random stream, so a run trained with a health head, an adversary or an anatomy projector
    gives the same scratch as one trained without; a trunk that keeps the health head (pretext_features) builds it."""
    plain = {"features": [4, 8, 16], "latent": 6}
    heads = {**HEALTH_KW, "contrast_classes": 5, "anatomy_outputs": 3}
    built = []
    for kwargs in (plain, heads):
        torch.manual_seed(0)
        built.append(DownstreamModel({"name": "dual_latent_unet", "kwargs": kwargs}, task, 2, ["T1w", "FLAIR"]))
    a, b = (m.state_dict() for m in built)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert built[1].config["backbone"]["kwargs"] == heads  # the run's architecture as given, for the predictor
    if task == "cls":
        torch.manual_seed(0)
        kept = DownstreamModel({"name": "dual_latent_unet", "kwargs": heads}, task, 2, ["T1w"], pretext_features=True)
        assert any(k.startswith("backbone.health_head.") for k in kept.state_dict())
        assert not any(k.startswith(("backbone.adversary.", "backbone.anatomy_projector.")) for k in kept.state_dict())


def test_a_backbone_says_from_its_settings_whether_its_pretext_classifier_can_be_read():
    """``reads_pretext_logits(kwargs)`` (what the demo's per-model read-out asks) agrees with the model those settings
    build: a pooled health head with contrast slots has logits per case; without slots or pooling it has none."""
    from neurofm.models.registry import model_class

    dual = model_class("dual_latent_unet")
    for kwargs in (HEALTH_KW, {**HEALTH_KW, "health_slots": False}, {**HEALTH_KW, "health_pool": 0}):
        bb = {"name": "dual_latent_unet", "kwargs": kwargs}
        reads = dual.reads_pretext_logits(kwargs)
        if kwargs["health_pool"]:
            m = DownstreamModel(bb, "cls", 2, ["T1w", "FLAIR"], mode="linear", pretext_features=True)
            assert reads == (m.backbone.feature_dims().pretext_logits > 0)
        assert reads == (kwargs is HEALTH_KW)
    assert not dual.reads_pretext_logits({"features": [4, 8, 16], "latent": 6})
    assert not model_class("resenc_unet").reads_pretext_logits({"health_classes": 2})


def test_learned_pooling_is_its_1x1x1_convolution_in_either_memory_layout():
    torch.manual_seed(0)
    bb = {"name": "dual_latent_unet", "kwargs": {"features": [4, 8, 16], "latent": 6}}
    model = DownstreamModel(bb, "reg", 1, ["T1w"], mode="full", pool_channels=5, pool="meanmax")
    x = torch.randn(3, 1, 16, 16, 16)
    with torch.no_grad():
        f = model.backbone.forward_features(x)
        # the modules as written, Conv3d then GELU, reduced over space: per map its mean, then its maximum
        by_conv = torch.cat(
            [t for p, m in zip(model.pool, f.maps, strict=True) for t in (p(m).mean((2, 3, 4)), p(m).amax((2, 3, 4)))],
            dim=1,
        )
        assert torch.allclose(model._learned_pool(f), by_conv, atol=1e-6)
        model.to(memory_format=torch.channels_last_3d)
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv3d) and m.in_channels > 1)
        assert not conv.weight.is_contiguous() and conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
        f_cl = model.backbone.forward_features(x)
        assert torch.allclose(model._learned_pool(f_cl), by_conv, atol=1e-5)


def test_auto_memory_format_is_channels_last_only_for_narrow_cnns_on_a_cpu():
    from neurofm.models.registry import create_model
    from neurofm.train.config import TrainerConfig
    from neurofm.train.trainer import memory_format

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    narrow = create_model("dual_latent_unet", features=[8, 16], latent=4)
    wide = create_model("dual_latent_unet", features=[32, 64], latent=4)
    auto = TrainerConfig()
    assert memory_format(auto, narrow, cpu) == torch.channels_last_3d
    assert memory_format(auto, wide, cpu) == torch.contiguous_format
    assert memory_format(auto, narrow, gpu) == torch.contiguous_format  # not measured on GPUs: left as it was
    assert memory_format(TrainerConfig(memory_format="channels_last"), wide, gpu) == torch.channels_last_3d
    assert memory_format(TrainerConfig(memory_format="contiguous"), narrow, cpu) == torch.contiguous_format
    with pytest.raises(ConfigError, match="memory_format"):
        TrainerConfig(memory_format="nhwc")


def test_every_trainer_trains_in_that_layout_and_ends_contiguous(tmp_path):
    from types import SimpleNamespace

    from neurofm.models.registry import create_model
    from neurofm.train.config import TrainerConfig
    from neurofm.train.trainer import MemoryLayout, build_trainer

    trainer = build_trainer(TrainerConfig(accelerator="cpu"), tmp_path, 1, loggers=False, progress=False)
    layout = next(c for c in trainer.callbacks if isinstance(c, MemoryLayout))
    net = create_model("dual_latent_unet", features=[8, 16], latent=4)
    weight = next(m for m in net.modules() if isinstance(m, torch.nn.Conv3d) and m.in_channels > 1).weight
    opt = torch.optim.SGD(net.parameters(), lr=0.1)  # built before: it must still hold the network's parameters
    cpu = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")))
    layout.setup(cpu, net, "fit")
    assert weight.is_contiguous(memory_format=torch.channels_last_3d) and not weight.is_contiguous()
    assert any(p is weight for p in opt.param_groups[0]["params"])  # the same parameter, laid out anew
    layout.on_fit_end(cpu, net)
    assert weight.is_contiguous()


def test_zero_output_makes_the_untrained_head_the_constant_predictor_and_training_moves_it():
    torch.manual_seed(0)
    bb = {"name": "dual_latent_unet", "kwargs": {"features": [4, 8, 16], "latent": 6}}
    x = torch.randn(3, 1, 16, 16, 16)
    for task, n_out, mode in [("reg", 1, "full"), ("cls", 3, "frozen"), ("cls", 2, "linear")]:
        model = DownstreamModel(bb, task, n_out, ["T1w"], mode=mode)
        assert model(x).abs().amax() > 0  # PyTorch's default init: the untrained head already varies with the scan
        model.zero_output()
        assert torch.equal(model(x), torch.zeros(3, n_out))  # the training mean / equal classes, for every scan
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = (model(x) - torch.randn(3, n_out)).pow(2).mean()
        loss.backward()
        opt.step()
        out = model(x)
        assert out.abs().amax() > 0 and out.std(0).amax() > 0  # the gradient reaches the zeroed layer
    with pytest.raises(ConfigError, match="cls/reg"):
        DownstreamModel(bb, "seg", 2, ["T1w"]).zero_output()
    with pytest.raises(ConfigError, match="head_init"):
        FinetuneConfig(task="reg", target="x", head_init="small")


def test_stem_adapts_to_other_contrasts_and_is_recorded():
    pre = create_model("vit_autoenc", size="tiny", img_size=16, patch_size=4, in_channels=4)
    stem = pre.state_dict()["net.patch_embedding.patch_embeddings.weight"]
    w, src = adapt_stem(stem, ["T1w", "T1c", "T2w", "FLAIR"], ["T1w", "FLAIR", "PDw"])
    assert src == [0, 3, -1]
    assert torch.equal(w[:, 0], stem[:, 0]) and torch.equal(w[:, 1], stem[:, 3])
    assert torch.allclose(w[:, 2], stem.mean(1))
    model = DownstreamModel({"name": "vit_autoenc", "kwargs": pre.config}, "cls", 2, ["T1w", "FLAIR"])
    report = load_pretrained(model, pre.state_dict(), ["T1w", "T1c", "T2w", "FLAIR"])
    assert report["stem_adaptation"]["source_channel"] == [0, 3]
    got = model.backbone.state_dict()["net.patch_embedding.patch_embeddings.weight"]
    assert torch.equal(got, stem[:, [0, 3]])
    blk = "net.blocks.0.mlp.linear1.weight"
    assert torch.equal(model.backbone.state_dict()[blk], pre.state_dict()[blk])


@pytest.mark.slow
@pytest.mark.parametrize(("task", "target"), [("seg", "lesion"), ("cls", "healthy"), ("reg", "age")])
def test_finetune_end_to_end_from_pretrained(task, target, tiny_store, pretrained_run, tmp_path):
    cfg = FinetuneConfig(
        task=task, target=target, source=str(pretrained_run), contrasts=["T1w", "FLAIR"], shots=4, **FAST
    )
    if task == "seg":  # the demo's weighted cross-entropy, trained through
        cfg = replace(cfg, seg_fg_weight=10.0)
    summary = finetune(tiny_store, tmp_path / "ft", cfg, progress=False)
    want = {
        "seg": {"dice", "nsd", "hd95"},
        "cls": {"auroc", "accuracy", "balanced_accuracy", "f1", "ece"},
        "reg": {"mae", "rmse", "pearson_r"},
    }[task]
    assert want <= set(summary["metrics"])
    split = summary["splits"][0]
    assert split["train_subjects"] == 4 and split["transferred_tensors"] > 10
    rows = pd.read_csv(tmp_path / "ft" / "predictions.csv")
    assert len(rows) == split["test_cases"] == 4  # 2 held-out subjects x 2 sessions
    model, info = model_from_checkpoint(tmp_path / "ft")
    assert info["model"]["name"] == "downstream" and info["run"]["task_info"]["target"] == target
    assert info["transfer"]["from_pretrained"]["transferred"] == split["transferred_tensors"]
    if task == "reg":
        assert (rows["prediction"] > 0).all()  # predictions are back in years, not z-scores


@pytest.mark.slow
def test_finetune_modes_and_scratch_via_cli(store_4mm, pretrained_4mm, tmp_path, run_cli):
    code, _, err = run_cli(
        "finetune",
        "--data",
        store_4mm,
        "--task",
        "cls",
        "--target",
        "diagnosis",
        "--out",
        tmp_path / "lin",
        "--from",
        pretrained_4mm,
        "--mode",
        "linear",
        "--folds",
        "2",
        "--steps",
        "4",
        "--patch",
        "32",
        "--workers",
        "0",
        "--no-tta",
        "--no-progress",
        "--bootstrap",
        "50",
    )
    assert code == 0, err
    s = json.loads((tmp_path / "lin" / "summary.json").read_text())
    assert s["folds"] == 2 and len(pd.read_csv(tmp_path / "lin" / "predictions.csv")) == 12  # every case once
    assert s["splits"][0]["trainable_parameters"] < 5000  # a linear probe trains only its head
    code, _, err = run_cli(
        "finetune",
        "--data",
        store_4mm,
        "--task",
        "reg",
        "--target",
        "age",
        "--out",
        tmp_path / "scr",
        "--from",
        "scratch",
        "--arch",
        "ssl3d-tiny",
        "--shots",
        "3",
        "--steps",
        "3",
        "--patch",
        "32",
        "--workers",
        "0",
        "--no-tta",
        "--no-progress",
        "--bootstrap",
        "50",
        "--set",
        "whole_scan=true",
        "--augment",
        "nnunet",  # the whole-scan path takes nnU-Net's augmentation too
    )
    assert code == 0, err
    run = json.loads((tmp_path / "scr" / "run.json").read_text())
    assert run["augment"] == "nnunet"
    assert run["threads"] == torch.get_num_threads()  # part of what made the numbers
    assert run["layout"] == ("contiguous" if torch.cuda.is_available() else "channels_last")  # and so is this (auto)
    assert run["machine"]["cpu"] and run["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    info, train, store = run["task_info"], set(run["split"]["train_subjects"]), Store(store_4mm)
    fits = np.max([store.record(k)["shape"] for k in store.keys if store.record(k)["subject"] in train], axis=0)
    step = info["whole_scan"]  # the encoder's downsampling: 8 for ssl3d-tiny
    assert step == 8
    assert all(n % step == 0 and m <= n < m + step for n, m in zip(info["whole_shape"], fits, strict=True))
    code, out, _ = run_cli(
        "evaluate", tmp_path / "scr", "--data", store_4mm, "--split", "all", "--no-tta", "--bootstrap", "50"
    )
    assert code == 0 and "mae" in out
    assert len(pd.read_csv(tmp_path / "scr" / f"eval-{store_4mm.name}" / "predictions.csv")) == 12
    # on its own store a run is scored on the subjects it held out, read from run.json's split (or, for runs
    # written before it, from the top level)
    held_out = set(run["split"]["test_subjects"])
    assert held_out and not held_out & train
    n_held_out = sum(store.record(k)["subject"] in held_out for k in store.keys)
    for layout in ("split", "top level"):
        if layout == "top level":
            old = {**run, "test_subjects": run["split"]["test_subjects"], "train_subjects": sorted(train)}
            del old["split"]
            (tmp_path / "scr" / "run.json").write_text(json.dumps(old))
        code, out, _ = run_cli("evaluate", tmp_path / "scr", "--data", store_4mm, "--no-tta", "--bootstrap", "50")
        assert code == 0, layout
        scored = pd.read_csv(tmp_path / "scr" / f"eval-{store_4mm.name}" / "predictions.csv")
        assert len(scored) == n_held_out < 12, layout
    code, _, err = run_cli(
        "finetune",
        "--data",
        store_4mm,
        "--task",
        "seg",
        "--target",
        "lesion",
        "--out",
        tmp_path / "x",
        "--mode",
        "linear",
        "--from",
        pretrained_4mm,
    )
    assert code == 2 and "linear probe" in err
    code, _, err = run_cli(
        "finetune", "--data", store_4mm, "--task", "seg", "--target", "lesion", "--out", tmp_path / "w",
        "--from", "scratch", "--set", "seg_fg_weight=0",
    )  # fmt: skip
    assert code == 2 and "seg_fg_weight should be > 0" in err
    code, _, err = run_cli(
        "finetune", "--data", store_4mm, "--task", "cls", "--target", "healthy", "--out", tmp_path / "v",
        "--from", "scratch", "--preset", "few-shot-seg",
    )  # fmt: skip
    assert code == 2 and "--task cls has none" in err and not (tmp_path / "v").exists()
    code, _, err = run_cli(
        "finetune", "--data", store_4mm, "--task", "seg", "--target", "lesion", "--out", tmp_path / "u",
        "--from", "scratch", "--augment", "elastic",
    )  # fmt: skip
    assert code == 2 and "--augment should be one of none, flips, nnunet" in err and not (tmp_path / "u").exists()


def test_contrast_dropout_keeps_a_random_nonempty_subset(tiny_store):
    from neurofm.data.finetune import FinetuneDataset

    cs = build_cases(Store(tiny_store), "seg", "lesion", ["T1w", "T1c", "T2w", "FLAIR", "PDw"])
    full = [c for c in cs.cases if len(c.contrasts) >= 4]
    ds = FinetuneDataset(tiny_store, cs, full, 16, length=60, seed=0, contrast_dropout=0.6)
    seen = [ds[i] for i in range(60)]
    counts = [int(s["present"].sum()) for s in seen]
    assert min(counts) >= 1 and 1 in counts and max(counts) > 1  # never none, often one, sometimes more
    for s in seen:  # a left-out contrast is zeroed like a missing one
        assert not s["x"][~s["present"]].any()
    plain = FinetuneDataset(tiny_store, cs, full, 16, length=5, seed=0)
    assert all(int(plain[i]["present"].sum()) >= 4 for i in range(5))
    with pytest.raises(ConfigError, match="contrast_dropout"):
        FinetuneConfig(task="seg", target="x", contrast_dropout=1.0)


def test_whole_scan_items_are_each_scan_padded_evenly_to_one_size(tiny_store, tmp_path):
    from neurofm.data.finetune import FinetuneDataset
    from neurofm.infer.runtime import global_windows
    from neurofm.tasks.finetune import whole_shape

    store = Store(tiny_store)
    cs = build_cases(store, "reg", "age", ["T1w"])
    shape = whole_shape(store, cs.cases, 16)
    biggest = np.max([store.record(c.key)["shape"] for c in cs.cases], axis=0)
    assert all(n % 16 == 0 and n - 16 < b <= n for n, b in zip(shape, biggest, strict=True))
    # a budget of one sample per case: sample i reads case i
    ds = FinetuneDataset(tiny_store, cs, cs.cases, 16, length=len(cs.cases), seed=0, augment=False, whole=shape)
    for i in range(4):
        item, case = ds[i], cs.cases[i]
        scan = np.asarray(store.read(case.key, "T1w"), np.float32)
        assert list(item["x"].shape) == [1, *shape]
        centre = tuple(slice((n - s) // 2, (n - s) // 2 + s) for n, s in zip(shape, scan.shape, strict=True))
        inner = item["x"][0][centre]
        np.testing.assert_array_equal(inner.numpy(), scan)  # the whole scan, centred
        assert float(item["x"].min()) == float(scan.min())  # padded with its background
        # the predictor reads the scan at the size it was trained at, however the scan is padded otherwise
        np.testing.assert_array_equal(global_windows(scan[None, None], 0, 16, shape)[0], item["x"].numpy())
    assert list(global_windows(np.zeros((1, 1, 20, 40, 7)), 0, 16, [32, 32, 32]).shape[2:]) == [32, 48, 32]
    with pytest.raises(ConfigError, match="whole"):
        FinetuneDataset(tiny_store, build_cases(store, "seg", "lesion", ["T1w"]), cs.cases, 16, 4, whole=shape)
    with pytest.raises(ConfigError, match="whole_scan"):
        FinetuneConfig(task="seg", target="lesion", whole_scan=True)
    vit = FinetuneConfig(task="reg", target="age", contrasts=["T1w"], arch="lamim16-tiny", shots=4, whole_scan=True)
    with pytest.raises(ConfigError, match="fixed .* cube"):  # a ViT takes its cube, not a whole scan
        finetune(tiny_store, tmp_path / "vit", replace(vit, **FAST))


def test_bad_finetune_settings():
    with pytest.raises(ConfigError, match="from scratch"):
        FinetuneConfig(task="cls", target="x", mode="frozen")
    with pytest.raises(ConfigError, match="task"):
        FinetuneConfig(task="detect", target="x")


def test_store_volume_and_case_count_helpers(tiny_store):
    cs = build_cases(Store(tiny_store), "reg", "age", ["T1w"])
    assert len({c.subject for c in cs.cases}) == 6 and np.isfinite([c.target for c in cs.cases]).all()


@pytest.fixture(scope="module")
def blob_heads(tmp_path_factory):
    """24 prepared heads whose size is known (``size``), with an ``unrelated`` target drawn independently."""
    from helpers import blob_volume, write_nifti
    from neurofm.preprocess import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("blobs")
    rng = np.random.default_rng(0)
    sizes, unrelated = rng.uniform(5, 12, 24), rng.uniform(20, 80, 24)
    for i, r in enumerate(sizes):
        vol = blob_volume((32, 32, 32), radius=float(r), seed=i)
        write_nifti(root / f"bids/sub-{i:02d}/anat/sub-{i:02d}_T1w.nii.gz", vol, np.diag([2.0, 2.0, 2.0, 1.0]))
    rows = "".join(f"sub-{i:02d}\t{r:.3f}\t{unrelated[i]:.3f}\t{int(r > 8.5)}\n" for i, r in enumerate(sizes))
    (root / "bids/participants.tsv").write_text("participant_id\tsize\tunrelated\tlarge\n" + rows)
    prepare(root / "bids", root / "store", PrepareConfig(spacing=2.0), progress=False)
    return root / "store"


def _mae_and_constant(ft, target_of):
    rows = pd.read_csv(ft / "predictions.csv")
    train_mean = np.mean([t for s, t in target_of.items() if s not in set(rows["subject"])])
    return rows, np.abs(rows["prediction"] - rows["target"]).mean(), np.abs(rows["target"] - train_mean).mean()


@pytest.mark.slow
@pytest.mark.parametrize(("linear_fit", "tta"), [("closed", False), ("closed", True), ("sgd", False)])
def test_regression_head_learns_a_target_that_is_a_function_of_the_image(blob_heads, tmp_path, linear_fit, tta):
    """The target is each head's size. A linear probe on a frozen, randomly initialised encoder must read it,
    fitted in closed form or by gradient steps: the pooled features differ little between scans around large
    shared offsets, so a head that reads them unnormalised learns a constant (as the first version did)."""
    cfg = FinetuneConfig(
        task="reg",
        target="size",
        source="random",
        arch="fomo25-tiny",
        mode="linear",
        linear_fit=linear_fit,
        shots=16,
        lr=3e-3,
        **{**FAST, "steps": 80, "tta": tta},
    )
    finetune(blob_heads, tmp_path / "ft", cfg, progress=False)
    sizes = {c.subject: c.target for c in build_cases(Store(blob_heads), "reg", "size").cases}
    rows, mae, constant_mae = _mae_and_constant(tmp_path / "ft", sizes)
    # measured: 0.2-0.36 x the constant's MAE over seeds 0-2; 0.95 x, predictions spread 0.02 x, without the norm
    assert mae < 0.5 * constant_mae, (mae, constant_mae)
    assert rows["prediction"].std() > 0.6 * rows["target"].std()  # predictions spread like the target


def _one_step_size_head(run_cli, blob_heads, out, head_init):
    """``neurofm finetune`` of a scratch size regressor for one step at a negligible rate with ``head_init``: the
    held-out rows, their MAE, the constant predictor's and every subject's size."""
    code, _, err = run_cli(
        "finetune", "--data", blob_heads, "--task", "reg", "--target", "size", "--from", "scratch", "--arch",
        "fomo25-tiny", "--shots", "16", "--steps", "1", "--lr", "1e-9", "--out", out, "--workers", "0", "--no-tta",
        "--no-progress", "--bootstrap", "20", "--set", f"head_init={head_init}",
    )  # fmt: skip
    assert code == 0, err
    sizes = {c.subject: c.target for c in build_cases(Store(blob_heads), "reg", "size").cases}
    return (*_mae_and_constant(out, sizes), sizes)


@pytest.mark.slow
def test_zero_head_init_starts_a_trained_head_at_the_constant_predictor(blob_heads, tmp_path, run_cli):
    """--set head_init=zero: after one step at a negligible rate the trained head still predicts the training
    targets' mean for every test scan (with PyTorch's default init it would vary by scan from the start)."""
    out = tmp_path / "ft"
    rows, mae, constant_mae, sizes = _one_step_size_head(run_cli, blob_heads, out, "zero")
    train_mean = np.mean([t for s, t in sizes.items() if s not in set(rows["subject"])])
    assert np.allclose(rows["prediction"], train_mean, atol=1e-3), rows["prediction"].tolist()
    assert mae == pytest.approx(constant_mae, abs=1e-3)
    assert json.loads((out / "run.json").read_text())["head_init"] == "zero"


@pytest.mark.slow
def test_probe_head_init_starts_training_from_the_closed_form_probe_lp_ft(blob_heads, tmp_path, run_cli):
    """--set head_init=probe (LP-FT): a linear layer beside the MLP head is fitted in closed form on the windows
    the predictor reads and the MLP's output layer starts at zero, so that after one step at a negligible rate the
    model predicts what the probe does: the size read at well under the constant's error (started at zero alone, the
    head predicts the training mean: the test above). The run reloads with its probe."""
    from neurofm.infer.predictor import Predictor

    out = tmp_path / "lpft"
    rows, mae, constant_mae, _ = _one_step_size_head(run_cli, blob_heads, out, "probe")
    assert mae < 0.5 * constant_mae, (mae, constant_mae)
    assert rows["prediction"].std() > 0.5 * rows["target"].std()
    probe = json.loads((out / "summary.json").read_text())["splits"][0]["probe"]
    assert probe["linear_fit"] == "closed" and probe["windows"] == 16 and probe["subjects"] == 16
    predictor = Predictor.from_run(out, tta=False)
    model = predictor.model
    assert model.probe is not None and model.probe.weight.abs().sum() > 0
    assert model.head[-1].weight.abs().max() < 1e-6  # the MLP's output layer still at zero: the start is the probe
    assert "whole_scan" not in predictor.info  # the probe was fitted on the crops' windows, as the model reads them
    key = rows["key"].iloc[0]
    again = predictor.predict({"T1w": np.asarray(Store(blob_heads).read(key, "T1w"), np.float32)}).value
    assert again == pytest.approx(rows["prediction"].iloc[0], rel=1e-5)
    with pytest.raises(ConfigError, match="LP-FT"):
        FinetuneConfig(task="reg", target="x", source="random", mode="linear", head_init="probe")
    with pytest.raises(ConfigError, match="LP-FT"):
        FinetuneConfig(task="seg", target="x", head_init="probe")


@pytest.mark.slow
@pytest.mark.parametrize("windows", ["tiles", "tiles-mean"])
def test_closed_form_probe_on_tiled_windows_weighs_only_the_stage_means_and_reloads(
    blob_heads, tmp_path, run_cli, windows
):
    """``--set probe_windows=tiles probe_features=stages`` through the CLI: the probe is fitted on every scan's
    patch-size windows (more rows than scans; ``tiles-mean``: one row per scan, its windows' features averaged),
    gives the latents zero weight, still reads whether the head is large, and the predictor reads the same windows
    (not the scan whole) and gives back the run's predictions."""
    from neurofm.infer.predictor import Predictor

    out = tmp_path / windows
    code, _, err = run_cli("finetune", "--data", blob_heads, "--task", "cls", "--target", "large", "--from", "random",
                           "--arch", "fomo25-tiny", "--mode", "linear", "--shots", "16", "--patch", "16", "--out", out,
                           "--no-tta", "--no-progress", "--set", f"probe_windows={windows}",
                           "--set", "probe_features=stages")  # fmt: skip
    assert code == 0, err
    probe = json.loads((out / "summary.json").read_text())["splits"][0]["probe"]
    rows_per_scan = (lambda n: n > 2 * 16) if windows == "tiles" else (lambda n: n == 16)  # the scans: 16, 1 session
    assert probe["subjects"] == 16 and rows_per_scan(probe["windows"]), probe
    predictor = Predictor.from_run(out, tta=False)
    assert "whole_scan" not in predictor.info
    model = predictor.model
    stages = model.feature_columns("stages")
    assert probe["features"] == "stages" and probe["columns"] == len(stages)
    others = torch.ones(model.head.weight.shape[1], dtype=torch.bool)
    others[stages] = False
    assert others.any() and model.head.weight[:, others].abs().max() == 0  # the latents' columns weigh nothing
    rows = pd.read_csv(out / "predictions.csv")
    assert (rows["prediction"] == rows["target"]).mean() >= 0.75, rows[["target", "prediction"]]
    key = rows["key"].iloc[0]
    again = predictor.predict({"T1w": np.asarray(Store(blob_heads).read(key, "T1w"), np.float32)}).probs
    assert again.tolist() == pytest.approx(json.loads(rows["prob"].iloc[0]), rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pretext", "pretext-logit"])
def test_closed_form_probe_on_the_pretext_heads_pooling_through_the_cli(blob_heads, tmp_path, run_cli, kind):
    """``--set probe_features=pretext`` from a run whose backbone has a pooled health head: the fine-tuned model holds
    that head with the run's weights, the probe weighs only its pooling's columns and the flags, reads whether the
    head is large, and the predictor reloads it and gives back the run's predictions. ``pretext-logit``: the probe
    weighs the head's classifier's logits and the flags (a random classifier: no accuracy asked)."""
    from neurofm.infer.predictor import Predictor
    from neurofm.io.checkpoint import WEIGHTS, load_weights, resolve_checkpoint, write_run_folder

    torch.manual_seed(0)
    pre = create_model("dual_latent_unet", **HEALTH_KW)
    run_cfg = {"model": {"name": "dual_latent_unet", "kwargs": HEALTH_KW}, "data": {"patch": 16}}
    write_run_folder(tmp_path / "pre", pre, run_cfg, {"step": 0})
    out = tmp_path / "ft"
    code, _, err = run_cli("finetune", "--data", blob_heads, "--task", "cls", "--target", "large", "--from",
                           tmp_path / "pre", "--mode", "linear", "--shots", "16", "--out", out, "--no-tta",
                           "--no-progress", "--set", f"probe_features={kind}")  # fmt: skip
    assert code == 0, err
    probe = json.loads((out / "summary.json").read_text())["splits"][0]["probe"]
    predictor = Predictor.from_run(out, tta=False)
    model = predictor.model
    cols = model.feature_columns(kind)
    assert probe["features"] == kind and probe["columns"] == len(cols) == (3 * 3 + 1 if kind == "pretext" else 2 + 1)
    others = torch.ones(model.head.weight.shape[1], dtype=torch.bool)
    others[cols] = False
    assert model.head.weight[:, others].abs().max() == 0 and model.head.weight[:, cols].abs().max() > 0
    saved = load_weights(resolve_checkpoint(out) / WEIGHTS)
    for k, v in pre.state_dict().items():
        if k.startswith("health_head."):
            assert torch.equal(saved[f"backbone.{k}"], v)  # the pretrained head, unchanged by the probe
    rows = pd.read_csv(out / "predictions.csv")
    if kind == "pretext":
        assert (rows["prediction"] == rows["target"]).mean() >= 0.75, rows[["target", "prediction"]]
    key = rows["key"].iloc[0]
    again = predictor.predict({"T1w": np.asarray(Store(blob_heads).read(key, "T1w"), np.float32)}).probs
    assert again.tolist() == pytest.approx(json.loads(rows["prob"].iloc[0]), rel=1e-4)


@pytest.mark.slow
def test_zero_shot_through_the_cli_reads_the_pretext_classifier_on_the_held_out_cases(blob_heads, tmp_path, run_cli):
    """``--mode linear --set linear_fit=zero-shot probe_features=pretext-logit`` from a run whose health pretext
    learned ``large`` (its ``data.health_label``): each held-out case's probabilities are the pretrained classifier's
    on that scan read whole, as pretraining read a one-scan case (the scan twice), computed here from the pretrained
    network itself; no labelled case changes them (another draw of the labelled subjects gives the same probabilities
    to the cases both hold out); a target other than the pretext's label is refused by the CLI with the reason."""
    from neurofm.infer.predictor import Predictor
    from neurofm.infer.runtime import global_windows
    from neurofm.io.checkpoint import write_run_folder

    torch.manual_seed(0)
    pre = create_model("dual_latent_unet", **HEALTH_KW).eval()
    model = {"name": "dual_latent_unet", "kwargs": HEALTH_KW}
    run_cfg = {"model": model, "data": {"patch": 16, "health_label": "large"}}
    write_run_folder(tmp_path / "pre", pre, run_cfg, {"step": 0})
    probs = {}
    for seed in (0, 1):
        out = tmp_path / f"zs{seed}"
        code, _, err = run_cli("finetune", "--data", blob_heads, "--task", "cls", "--target", "large", "--from",
                               tmp_path / "pre", "--mode", "linear", "--shots", "8", "--out", out, "--no-tta",
                               "--no-progress", "--seed", seed, "--set", "linear_fit=zero-shot",
                               "--set", "probe_features=pretext-logit")  # fmt: skip
        assert code == 0, err
        probe = json.loads((out / "summary.json").read_text())["splits"][0]["probe"]
        assert probe["linear_fit"] == "zero-shot" and probe["labelled_cases_read"] == 0, probe
        assert probe["health_label"] == "large" and probe["class_map"] == {"0": 0, "1": 1}
        rows = pd.read_csv(out / "predictions.csv")
        probs[seed] = {k: json.loads(p) for k, p in zip(rows["key"], rows["prob"], strict=True)}
    both = sorted(set(probs[0]) & set(probs[1]))
    assert both and all(probs[0][k] == pytest.approx(probs[1][k], rel=1e-5) for k in both)
    ids = torch.tensor([contrast_id("T1w")] * 2)
    for key in both[:3]:
        x = np.asarray(Store(blob_heads).read(key, "T1w"), np.float32)[None, None]
        scan = torch.from_numpy(global_windows(x, 16, int(pre.downsampling)))
        with torch.no_grad():
            want = torch.softmax(pre.health_logits(pre.forward_features(torch.cat([scan, scan])), 2, ids), 1)[0]
        assert probs[0][key] == pytest.approx(want.tolist(), rel=1e-4, abs=1e-6)
    # the run is an ordinary checkpoint: the predictor reloads it (the standardisation's fixed scale included)
    again = Predictor.from_run(tmp_path / "zs0", tta=False).predict(
        {"T1w": np.asarray(Store(blob_heads).read(both[0], "T1w"), np.float32)}
    )
    assert again.probs.tolist() == pytest.approx(probs[0][both[0]], rel=1e-4, abs=1e-6)
    write_run_folder(tmp_path / "pre-healthy", pre, {**run_cfg, "data": {"patch": 16}}, {"step": 0})  # "healthy"
    code, _, err = run_cli("finetune", "--data", blob_heads, "--task", "cls", "--target", "large", "--from",
                           tmp_path / "pre-healthy", "--mode", "linear", "--out", tmp_path / "bad", "--no-progress",
                           "--set", "linear_fit=zero-shot", "--set", "probe_features=pretext-logit")  # fmt: skip
    assert code != 0 and "health_label='healthy'" in err and "'large'" in err, err


@pytest.mark.slow
def test_closed_form_probe_stays_at_the_constant_on_an_unrelated_target_and_reloads(blob_heads, tmp_path, run_cli):
    """Where the features say nothing about the target, the cross-validated penalty (one-standard-error rule)
    keeps the probe at the training mean instead of fitting 16 subjects' noise; the probe is a checkpoint that
    `neurofm predict` applies as it was fitted, whole scans in."""
    from neurofm.infer.predictor import Predictor

    cfg = FinetuneConfig(
        task="reg", target="unrelated", source="random", arch="fomo25-tiny", mode="linear", shots=16, **FAST
    )
    finetune(blob_heads, tmp_path / "ft", cfg, progress=False)
    targets = {c.subject: c.target for c in build_cases(Store(blob_heads), "reg", "unrelated").cases}
    rows, mae, constant_mae = _mae_and_constant(tmp_path / "ft", targets)
    assert mae < 1.1 * constant_mae, (mae, constant_mae)
    assert rows["prediction"].std() < 0.2 * rows["target"].std()
    probe = json.loads((tmp_path / "ft" / "summary.json").read_text())["splits"][0]["probe"]
    assert probe["linear_fit"] == "closed" and probe["windows"] == 16 and probe["penalty"] >= probe["cv_best_penalty"]
    predictor = Predictor.from_run(tmp_path / "ft", tta=False)
    assert predictor.info["whole_scan"] == predictor.model.downsampling
    key = rows["key"].iloc[0]
    again = predictor.predict({"T1w": np.asarray(Store(blob_heads).read(key, "T1w"), np.float32)}).value
    assert again == pytest.approx(rows["prediction"].iloc[0], rel=1e-5)
    # classification through the CLI: is the head large? (logistic regression, balanced classes)
    out = tmp_path / "cls"
    code, _, err = run_cli("finetune", "--data", blob_heads, "--task", "cls", "--target", "large", "--from", "random",
                           "--arch", "fomo25-tiny", "--mode", "linear", "--shots", "16", "--out", out)  # fmt: skip
    assert code == 0, err
    cls_rows = pd.read_csv(out / "predictions.csv")
    assert (cls_rows["prediction"] == cls_rows["target"]).mean() >= 0.75, cls_rows[["target", "prediction"]]


def test_foreground_weight_scales_the_segmentation_cross_entropy_and_not_the_dice():
    """``seg_fg_weight``: the cross-entropy of lesion voxels counts ``w`` times (a weighted mean); Dice unchanged."""
    import math

    from neurofm.tasks.finetune import FinetuneModule

    model = DownstreamModel({"name": "dual_latent_unet", "kwargs": {"features": [4, 8]}}, "seg", 2, ["T1w"])
    y = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    y[0, 0, :2, :2, :1] = 1  # 4 lesion voxels of 64
    logits = torch.zeros(1, 2, 4, 4, 4)
    logits[:, 0] = 2.0  # background predicted everywhere: the empty-prediction plateau
    fg, bg = math.log1p(math.exp(2.0)), math.log1p(math.exp(-2.0))  # -log p of each voxel's true class
    losses = {}
    for w in (1.0, 10.0):
        cfg = FinetuneConfig(task="seg", target="lesion", seg_fg_weight=w)
        losses[w] = FinetuneModule(model, cfg).loss(logits, y).item()
    p_fg = 1 / (1 + math.exp(2.0))
    dice = 1 - 2 * 4 * p_fg / (64 * p_fg + 4)  # batch Dice of the lesion class (smoothing ~1e-5)
    assert losses[1.0] == pytest.approx(dice + (4 * fg + 60 * bg) / 64, rel=1e-4)
    assert losses[10.0] == pytest.approx(dice + (40 * fg + 60 * bg) / 100, rel=1e-4)
    with pytest.raises(ConfigError, match="seg_fg_weight"):
        FinetuneConfig(task="seg", target="lesion", seg_fg_weight=0)
    with pytest.raises(ConfigError, match="--task reg has none"):
        FinetuneConfig(task="reg", target="age", seg_fg_weight=10)


def test_feature_standardisation_takes_about_64_crops_worth_of_voxels():
    from types import SimpleNamespace

    from neurofm.tasks.finetune import norm_items

    crops = SimpleNamespace(whole=None, patch=32, cases=[0] * 6)
    assert norm_items(crops) == 64 and norm_items(SimpleNamespace(whole=None, patch=32, cases=[0] * 40)) == 80
    whole = SimpleNamespace(whole=[64, 64, 64], patch=32, cases=[0] * 6)  # a whole scan: 8 crops' voxels
    assert norm_items(whole) == 12  # two per case beats 64 / 8
    assert norm_items(SimpleNamespace(whole=[64, 64, 64], patch=32, cases=[0] * 2)) == 8
    assert norm_items(SimpleNamespace(whole=[16, 16, 16], patch=32, cases=[0] * 2)) == 64  # smaller than a crop


def test_the_few_shot_preset_is_the_demos_segmentation_protocol():
    """``--preset few-shot-seg`` gives a CLI user the settings the demo's segmentation rows were measured with."""
    from neurofm.demo import DemoConfig, finetune_config

    cfg = FinetuneConfig.resolve("few-shot-seg", None, [], values={"task": "seg", "target": "lesion"})
    demo = finetune_config(DemoConfig(), "fomo25-tiny-synth", "seg", "lesion")
    assert cfg.mode == DemoConfig().modes["seg"][0]
    for name in ("steps", "lr", "seg_fg_weight", "fg_p", "head_warmup", "augment"):
        assert getattr(cfg, name) == getattr(demo, name), name
    flagged = FinetuneConfig.resolve(
        "few-shot-seg", None, ["seg_fg_weight=5"], values={"task": "seg", "target": "x", "lr": 3e-3}
    )
    assert (flagged.lr, flagged.seg_fg_weight, flagged.steps) == (3e-3, 5.0, 200)  # flags and --set win over the preset
    assert cfg.batch_size == demo.batch_size


def test_demo_batch_size_is_per_task():
    """The demo's crops per step reach each task's fine-tuning settings: one number for all, or per task."""
    from neurofm.demo import DemoConfig, finetune_config

    per_task = DemoConfig(finetune_batch={"seg": 2, "cls": 4, "reg": 8})
    sizes = {t: finetune_config(per_task, "fomo25-tiny-synth", t, "x").batch_size for t in ("seg", "cls", "reg")}
    assert sizes == {"seg": 2, "cls": 4, "reg": 8}
    assert finetune_config(DemoConfig(finetune_batch=3), "fomo25-tiny-synth", "cls", "x").batch_size == 3


def test_encoder_schedule_holds_then_warms_into_the_head_cosine():
    from neurofm.tasks.finetune import cosine, encoder_lr_factor

    assert [encoder_lr_factor(s, 100, 25, 10) for s in (0, 24)] == [0.0, 0.0]  # the head trains alone
    assert encoder_lr_factor(30, 100, 25, 10) == pytest.approx(0.5 * cosine(30, 100))
    assert encoder_lr_factor(35, 100, 25, 10) == pytest.approx(cosine(35, 100))  # then the head's cosine
    assert encoder_lr_factor(100, 100, 25, 10) == pytest.approx(0.0, abs=1e-12)
    assert encoder_lr_factor(5, 100, 0, 10) == pytest.approx(0.5 * cosine(5, 100))  # no warm-up stage


def test_constant_predictor_rows_pair_with_the_fine_tuning_split(tiny_store):
    from neurofm.evaluate.scoring import constant_rows

    cfg = FinetuneConfig(task="reg", target="age", contrasts=["T1w"], shots=4, seed=3)
    rows = constant_rows(Store(tiny_store), cfg)
    cs = build_cases(Store(tiny_store), "reg", "age", ["T1w"])
    train = {c.subject for c in cs.cases} - {r["subject"] for r in rows}
    assert len(train) == 4 and len(rows) == 4  # the 2 held-out subjects' sessions
    mean = np.mean([c.target for c in cs.cases if c.subject in train])
    assert all(r["prediction"] == pytest.approx(mean) for r in rows)
    cls = constant_rows(Store(tiny_store), FinetuneConfig(task="cls", target="healthy", shots=4))
    assert len({tuple(r["prob"]) for r in cls}) == 1 and sum(cls[0]["prob"]) == pytest.approx(1.0)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("source", "task", "target"),
    [("primus", "seg", "lesion"), ("primus", "cls", "healthy"), ("primus", "reg", "age"), ("nnunet", "seg", "lesion")],
)
def test_finetune_from_imported_field_checkpoints(source, task, target, tiny_store, tmp_path, run_cli):
    """nnssl's Primus and a 4-channel nnU-Net ResEnc, imported through the CLI, fine-tune on every task."""
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
    from torch import nn

    from field_checkpoints import PRIMUS_KEYS, nnssl_checkpoint, nnunet_checkpoint

    torch.manual_seed(0)
    if source == "primus":
        net = create_model("primus", size="tiny", img_size=32)
        ck = nnssl_checkpoint(
            net,
            "Primus",
            None,
            patch=[32, 32, 32],
            spacing=[2.0, 2.0, 2.0],
            **PRIMUS_KEYS,
        )
    else:
        feats, blocks = [4, 8, 16, 16], [1, 1, 1, 1]
        net = ResidualEncoderUNet(
            4, 4, feats, nn.Conv3d, 3, [1, 2, 2, 2], blocks, 3, [1, 1, 1], True, nn.InstanceNorm3d,
            {"eps": 1e-5, "affine": True}, None, None, nn.LeakyReLU, {"inplace": True},
        )  # fmt: skip
        ck = nnunet_checkpoint(
            net, feats, blocks, spacing=[2.0] * 3, patch=[32] * 3,
            channels={"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}, labels={"background": 0, "a": 1, "b": 2},
        )  # fmt: skip
    torch.save(ck, tmp_path / "checkpoint_final.pth")
    code, _, err = run_cli("import", "nnssl", tmp_path / "checkpoint_final.pth", "--out", tmp_path / "imp")
    assert code == 0, err
    args = ["--steps", "3", "--shots", "3", "--workers", "0", "--no-tta", "--no-progress", "--bootstrap", "20"]
    code, _, err = run_cli(
        "finetune", "--data", tiny_store, "--task", task, "--target", target, "--from", tmp_path / "imp",
        "--out", tmp_path / "ft", "--contrasts", "T1w,FLAIR", *args,
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads((tmp_path / "ft" / "summary.json").read_text())
    split = summary["splits"][0]
    assert split["transferred_tensors"] > 10
    _, info = model_from_checkpoint(tmp_path / "ft")
    assert info["run"]["data"]["patch"] == 32  # the source plan's patch, by default
    left = info["transfer"]["from_pretrained"]["initialised"]
    assert not [k for k in left if k.startswith(("encoder.", "decoder.encoder.", "eva.", "down_projection."))], left
    stem = info["transfer"]["from_pretrained"]["stem_adaptation"]
    assert (stem is not None) == (source == "nnunet")  # 4 channels -> the shared 1-channel encoder


def test_fixed_training_subjects_may_take_a_whole_site():
    from neurofm.data.finetune import CaseSet, make_splits

    cases = [Case(f"s{i}", f"s{i}", "", ["T1w"], float(i), site=f"site-{i % 3}") for i in range(9)]
    cs = CaseSet(cases=cases, task="reg", target="age", contrasts=["T1w"], classes=[])
    site0 = [c.subject for c in cases if c.site == "site-0"]
    ((train, test),) = make_splits(cs, train_subjects=site0, train_sites=["site-0"])
    assert {c.site for c in train} == {"site-0"} and {c.site for c in test} == {"site-1", "site-2"}
    ((_, test),) = make_splits(cs, train_subjects=site0, train_sites=["site-0"], test_sites=["site-2"])
    assert {c.site for c in test} == {"site-2"}
    with pytest.raises(ConfigError, match="unknown site"):
        make_splits(cs, train_subjects=site0, train_sites=["site-9"])


@pytest.mark.slow
def test_temperature_is_fitted_on_held_out_training_subjects_and_kept_with_the_model(tiny_store, tmp_path, run_cli):
    args = ["finetune", "--data", tiny_store, "--task", "cls", "--target", "healthy", "--from", "scratch"]
    args += ["--arch", "fomo25-tiny", "--shots", "4", "--steps", "3", "--workers", "0", "--no-tta", "--no-progress"]
    code, _, err = run_cli(*args, "--bootstrap", "20", "--calibration", "0.5", "--out", tmp_path / "ft")
    assert code == 0, err
    split = json.loads((tmp_path / "ft" / "summary.json").read_text())["splits"][0]
    assert split["calibration_cases"] > 0 and split["train_subjects"] == 2  # 2 of the 4 held out for it
    _, info = model_from_checkpoint(tmp_path / "ft")
    t = info["run"]["task_info"]["temperature"]
    assert t == pytest.approx(split["temperature"]) and 0.05 <= t <= 20
    assert (tmp_path / "ft" / "reliability.png").stat().st_size > 2000
    code, _, err = run_cli(*args, "--calibration", "0.5", "--shots", "2", "--out", tmp_path / "few")
    assert code == 2 and "at least 3 training subjects" in err
