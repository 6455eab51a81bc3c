from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neurofm.errors import ConfigError
from neurofm.models.dual_latent import (
    HEALTH_SLOTS,
    DualLatentUNet,
    PooledHealthHead,
    RunningStandardise,
    pair_slots,
)
from neurofm.models.resenc import ResEncUNet
from neurofm.objectives import build_objective, objective_config
from neurofm.objectives.fomo25 import (
    Fomo25Config,
    Fomo25Loss,
    class_agreement,
    class_usage,
    contrast_nce,
    fit_linear_probe,
    kl_divergence,
    random_remap,
)
from neurofm.objectives.masking import block_mask, coarse_dropout, holes_for_fraction
from neurofm.objectives.ssl3d import SSL3DConfig


def test_block_mask_hides_the_exact_ratio_in_whole_blocks():
    g = torch.Generator().manual_seed(0)
    m = block_mask(3, (16, 16, 32), 4, 0.6, generator=g)
    assert m.shape == (3, 1, 16, 16, 32) and m.dtype == torch.bool
    n_blocks = 4 * 4 * 8
    for b in range(3):
        assert m[b].sum().item() == round(0.6 * n_blocks) * 64
        blocks = m[b, 0].view(4, 4, 4, 4, 8, 4).permute(0, 2, 4, 1, 3, 5).reshape(-1, 64)
        assert ((blocks.sum(1) == 0) | (blocks.sum(1) == 64)).all()  # whole blocks only
    assert not torch.equal(m[0], m[1])
    with pytest.raises(ConfigError, match="multiple of the mask block"):
        block_mask(1, (10, 16, 16), 4, 0.5)
    with pytest.raises(ConfigError, match=r"\(0, 1\)"):
        block_mask(1, (16, 16, 16), 4, 1.3)


def test_coarse_dropout_is_per_channel_and_fills_zero():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 24, 24, 24) + 5
    y, m = coarse_dropout(x, 4, 40, generator=g)
    assert (y[m] == 0).all() and torch.equal(y[~m], x[~m])
    assert not torch.equal(m[:, 0], m[:, 1])  # channels are dropped independently
    one, m1 = coarse_dropout(torch.ones(1, 1, 10, 10, 10), 3, 1, generator=g)
    assert m1.sum() == 27  # a single hole is exactly hole^3 voxels
    frac = coarse_dropout(torch.ones(1, 1, 32, 32, 32), 4, holes_for_fraction((32,) * 3, 4))[1].float().mean()
    assert 0.25 < frac < 0.45


def test_kl_is_zero_for_the_prior():
    mu, lv = torch.zeros(2, 3, 2, 2, 2), torch.zeros(2, 3, 2, 2, 2)
    assert torch.allclose(kl_divergence(mu, lv), torch.zeros(2))
    assert (kl_divergence(mu + 1, lv) > 0).all()


class _ContrastPainter(nn.Module):
    """A fake dual-latent model: decode() paints the contrast latent's value everywhere."""

    def decode(self, z_s, z_c):
        return z_c.mean(dim=(1, 2, 3, 4), keepdim=True).expand(-1, 1, 8, 8, 8)


def test_swap_target_is_the_other_contrast():
    loss = Fomo25Loss(Fomo25Config())
    x_a, x_b = torch.full((2, 1, 8, 8, 8), 1.0), torch.full((2, 1, 8, 8, 8), 5.0)
    zs = torch.zeros(2, 2, 1, 1, 1)
    zc_a, zc_b = torch.full_like(zs, 1.0), torch.full_like(zs, 5.0)
    s_ab, s_ba, pred_ab, pred_ba = loss.swap_terms(_ContrastPainter(), zs, zs, zc_a, zc_b, x_a, x_b)
    # [anatomy, zc_b] renders b's contrast and is scored against x_b (and vice versa): zero loss
    assert torch.allclose(pred_ab, x_b) and torch.allclose(pred_ba, x_a)
    assert torch.allclose(s_ab, torch.zeros(2)) and torch.allclose(s_ba, torch.zeros(2))


def _pair_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "x_a": torch.randn(2, 1, 16, 16, 16, generator=g),
        "x_b": torch.randn(2, 1, 16, 16, 16, generator=g),
        "pair_valid": torch.tensor([True, True]),
    }


def _grads(model, objective, batch, seed=1):
    model.zero_grad()
    torch.manual_seed(seed)  # same masks and reparameterisation noise in every call
    total, terms, _ = objective(model, batch, progress=20.0)
    total.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, terms


@pytest.mark.parametrize("switch", ["w_swap", "w_align", "w_repel", "w_kl"])
def test_fomo25_ablation_switch_removes_its_term(switch):
    torch.manual_seed(0)
    model = DualLatentUNet(features=(4, 8, 16), latent=4)
    batch = _pair_batch()
    full_g, full_t = _grads(model, Fomo25Loss(Fomo25Config()), batch)
    abl_g, abl_t = _grads(model, Fomo25Loss(Fomo25Config(**{switch: 0.0})), batch)
    term = switch[2:]
    assert term in full_t and term not in abl_t
    enc = "encoder.stages.0.0.convs.0.conv.weight"
    assert not torch.allclose(full_g[enc], abl_g[enc])
    again_g, _ = _grads(model, Fomo25Loss(Fomo25Config()), batch)
    assert torch.allclose(full_g[enc], again_g[enc])  # the difference is the term, not randomness


def test_single_scan_sessions_contribute_only_reconstruction_and_kl():
    torch.manual_seed(0)
    model = DualLatentUNet(features=(4, 8, 16), latent=4)
    batch = _pair_batch()
    batch["pair_valid"] = torch.tensor([False, False])
    _, terms = _grads(model, Fomo25Loss(Fomo25Config()), batch)
    assert terms["swap"] == 0 and terms["align"] == 0 and terms["repel"] == 0
    assert terms["rec"] > 0 and terms["kl"] >= 0


def test_random_remap_is_one_intensity_map_per_sample_applied_alike_to_every_crop():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 6, 6, 6, generator=g) * 2 + 1
    ref = torch.randn(4, 1, 6, 6, 6, generator=g)
    ref[:, :, 0, 0, :2] = x[:, :, 0, 0, :2]  # voxels of the same value in both crops
    torch.manual_seed(1)
    y, y_ref = random_remap(x, (ref,), knots=5)
    assert y.shape == x.shape and y_ref.shape == ref.shape
    # a function of the intensity, the same for both crops of a sample
    assert torch.allclose(y[:, :, 0, 0, :2], y_ref[:, :, 0, 0, :2], atol=1e-5)
    # the remapped crop keeps the crop's mean and standard deviation
    assert torch.allclose(y.mean(dim=(1, 2, 3, 4)), x.mean(dim=(1, 2, 3, 4)), atol=1e-4)
    assert torch.allclose(y.std(dim=(1, 2, 3, 4)), x.std(dim=(1, 2, 3, 4)), atol=1e-4)
    # the darkest voxel over both crops stays the darkest
    both_x, both_y = torch.cat([x, ref], 1).flatten(1), torch.cat([y, y_ref], 1).flatten(1)
    darkest = both_y.gather(1, both_x.argmin(1, keepdim=True))[:, 0]
    assert torch.allclose(darkest, both_y.amin(1))
    # piecewise linear: within one segment the map is affine, so the remapped values of three inputs spaced
    # evenly inside a segment are evenly spaced too
    lo, hi = both_x.amin(1), both_x.amax(1)
    probe = lo[:, None] + (hi - lo)[:, None] * torch.tensor([0.02, 0.06, 0.10])  # inside the first of 5 segments
    torch.manual_seed(1)
    grid = torch.cat([x.flatten(1), ref.flatten(1), probe], 1)
    (mapped,) = random_remap(grid.view(4, 1, -1, 1, 1), (), knots=5)
    m = mapped.flatten(1)[:, -3:]
    assert torch.allclose(m[:, 1] - m[:, 0], m[:, 2] - m[:, 1], atol=1e-4)
    # a new draw gives a new map
    torch.manual_seed(2)
    (z,) = random_remap(x, (), knots=5)
    assert not torch.allclose(z, y, atol=1e-3)


def test_remap_makes_pairs_of_a_scan_and_its_remapping_and_hides_their_contrast():
    torch.manual_seed(0)
    cfg = Fomo25Config(remap_p=1.0, swap_contrast="reference", swap_anatomy="other")
    batch = cfg.example_batch(3, 8, {})
    batch["pair_valid"] = torch.tensor([False, True, True])
    batch["contrast_b"] = torch.tensor([1, 2, 3])
    batch["x_a"][:, :, 4:] = batch["x_a"][:, :, :4]  # two halves alike
    batch["x_a_ref"][:, :, :4] = batch["x_a"][:, :, :4]  # and the reference crop's first half too
    out = Fomo25Loss(cfg).remap_pairs(batch, use_ref=True)
    assert out["pair_valid"].all() and (out["contrast_b"] == -1).all()
    assert torch.equal(out["contrast_a"], batch["contrast_a"]) and torch.equal(out["x_a"], batch["x_a"])
    # the second scan and its reference crop are one function of the first scan's intensities
    assert torch.allclose(out["x_b"][:, :, 4:], out["x_b"][:, :, :4], atol=1e-5)
    assert torch.allclose(out["x_b_ref"][:, :, :4], out["x_b"][:, :, :4], atol=1e-5)
    assert not torch.allclose(out["x_b"], batch["x_b"])
    assert torch.allclose(out["x_b"].mean(dim=(1, 2, 3, 4)), batch["x_a"].mean(dim=(1, 2, 3, 4)), atol=1e-4)
    none = Fomo25Loss(Fomo25Config(remap_p=0.0)).remap_pairs(batch, use_ref=True)
    assert torch.equal(none["x_b"], batch["x_b"]) and torch.equal(none["pair_valid"], batch["pair_valid"])
    # in training a single-scan session then has a pair: the pair terms see it
    model = DualLatentUNet(features=(4, 8, 16), latent=4, contrast_code="global")
    one = _pair_batch()
    one["pair_valid"] = torch.tensor([False, False])
    _, terms = _grads(model, Fomo25Loss(Fomo25Config(remap_p=1.0)), one)
    assert terms["swap"] > 0 and terms["align"] > 0
    with pytest.raises(ConfigError, match="remap_p"):
        Fomo25Config(remap_p=1.5)
    with pytest.raises(ConfigError, match="remap_knots"):
        Fomo25Config(remap_knots=0)


def test_ssl3d_ablation_switches():
    torch.manual_seed(0)
    model = ResEncUNet(features=(4, 8, 16), blocks=(1, 1, 1), anatomy_outputs=6, health_classes=2)
    batch = {
        "x": torch.randn(2, 1, 16, 16, 16),
        "volumes": torch.randn(2, 6),
        "has_volumes": torch.tensor([True, True]),
        "health": torch.tensor([0, 1]),
    }
    full_g, full_t = _grads(model, build_objective(SSL3DConfig(block=4)), batch)
    for switch in ("w_anatomy", "w_health"):
        abl_g, abl_t = _grads(model, build_objective(SSL3DConfig(block=4, **{switch: 0.0})), batch)
        assert switch[2:] in full_t and switch[2:] not in abl_t
        key = "encoder.stages.2.blocks.0.conv2.conv.weight"
        assert not torch.allclose(full_g[key], abl_g[key])
    # unknown health labels (-1) give no gradient from the classifier
    batch["health"] = torch.tensor([-1, -1])
    _, t = _grads(model, build_objective(SSL3DConfig(block=4)), batch)
    assert t["health"] == 0


def test_ssl3d_heads_read_the_clean_crop_when_asked_and_the_reconstruction_stays_masked():
    model = ResEncUNet(features=(4, 8, 16), blocks=(1, 1, 1), anatomy_outputs=6, health_classes=2).eval()
    x = torch.randn(2, 1, 16, 16, 16)
    batch = {
        "x": x,
        "volumes": torch.randn(2, 6),
        "has_volumes": torch.tensor([True, True]),
        "health": torch.tensor([0, 1]),
    }
    terms = {}
    for heads in ("masked", "clean"):
        torch.manual_seed(3)  # the same mask for both
        _, terms[heads], _ = build_objective(SSL3DConfig(block=4, heads_input=heads))(model, batch)
    with torch.no_grad():
        clean = model.forward_pretext(x, reconstruct=False)
    assert clean["reconstruction"] is None
    # the known answer: the clean pass's cross-entropy and cosine, not the masked pass's
    assert torch.allclose(terms["clean"]["health"], F.cross_entropy(clean["health"], batch["health"]), atol=1e-6)
    cos = F.cosine_similarity(clean["anatomy"], batch["volumes"], dim=1, eps=1e-6)
    assert torch.allclose(terms["clean"]["anatomy"], (1 - cos).mean(), atol=1e-6)
    assert not torch.allclose(terms["masked"]["health"], terms["clean"]["health"])
    assert torch.allclose(terms["masked"]["mae"], terms["clean"]["mae"])  # the reconstruction is untouched
    with pytest.raises(ConfigError, match="heads_input"):
        SSL3DConfig(heads_input="both")


def test_objective_config_validation():
    with pytest.raises(ConfigError, match="unknown objective kind"):
        objective_config({"kind": "simclr"})
    with pytest.raises(ConfigError, match="unknown objective option"):
        objective_config({"kind": "fomo25", "w_swapp": 1.0})
    with pytest.raises(ConfigError, match="rec_loss"):
        Fomo25Config(rec_loss="l2")
    with pytest.raises(ConfigError, match=">= 0"):
        Fomo25Config(w_swap=-1)


def test_kl_is_summed_over_latent_elements_as_spec_states():
    mu, lv = torch.ones(2, 3, 2, 2, 2), torch.zeros(2, 3, 2, 2, 2)  # 0.5 nats per element
    assert torch.allclose(kl_divergence(mu, lv), torch.full((2,), 0.5 * 24))
    assert torch.allclose(kl_divergence(mu, lv, "mean"), torch.full((2,), 0.5))


def test_a_shared_offset_meets_the_plain_cosine_but_not_centred_or_dense_alignment():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 8, 2, 2, 2, generator=g), torch.randn(4, 8, 2, 2, 2, generator=g)  # unrelated anatomy
    offset = 20 * torch.randn(1, 8, 2, 2, 2, generator=g)
    valid = torch.ones(4)
    plain = Fomo25Loss(Fomo25Config(align="cosine")).align_term(a + offset, b + offset, valid)
    assert plain < 0.05  # "aligned" by the offset alone
    centred = Fomo25Loss(Fomo25Config(align="centred"))
    centred.align_term(a + offset, b + offset, valid)  # sets the running mean
    assert centred.align_term(a + offset, b + offset, valid) > 0.6
    nce = Fomo25Loss(Fomo25Config(align="dense_nce", align_temperature=0.1))
    offset_only = nce.align_term(a + offset, b + offset, valid)
    same = nce.align_term(a, a + 0.01 * b, valid)
    # the offset tells positions apart but not samples: the loss stays near log(4 samples); agreeing anatomy meets it
    assert same < 0.3 and offset_only > 0.9 * math.log(4)


def test_mse_alignment_sees_what_a_cosine_misses_a_per_contrast_offset_or_scale():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 8, 2, 2, 2, generator=g)
    a = a - a.mean(0)  # the dataset mean is 0, so the centred cosine sees the latents as they are
    valid = torch.ones(4)
    for align in ("centred", "mse"):
        loss = Fomo25Loss(Fomo25Config(align=align))
        loss.align_term(a, a, valid)  # running statistics from the anatomy itself
        scaled = loss.align_term(a, 3 * a, valid)  # contrast b triples the anatomy latent
        same = loss.align_term(a, a.clone(), valid)
        if align == "centred":
            assert scaled < 1e-4  # parallel vectors: the cosine cannot see it
        else:
            assert scaled > 1.0 and same < 1e-6
    mse = Fomo25Loss(Fomo25Config(align="mse")).eval()  # eval: the statistics stay those of the first call
    mse.align_term(a, a, valid)
    shifted = mse.align_term(a, a + 1.0, valid)  # a per-contrast offset of 1 in every channel
    var = torch.cat([a, a]).transpose(0, 1).flatten(1).var(1)  # each channel's spread over crops and positions
    assert shifted == pytest.approx(float((1.0 / var).mean()), rel=1e-2)
    # scale-free: the same anatomy at a thousandth of the size (statistics re-estimated) costs the same
    small = Fomo25Loss(Fomo25Config(align="mse")).eval()
    small.align_term(1e-3 * a, 1e-3 * a, valid)
    assert small.align_term(1e-3 * a, 1e-3 * (a + 1.0), valid) == pytest.approx(float(shifted), rel=1e-4)


def test_mean_alignment_measures_a_contrast_offset_against_the_spread_of_crop_means():
    g = torch.Generator().manual_seed(1)
    # anatomy that varies a lot from position to position but little between crop means
    a = 5 * torch.randn(8, 4, 4, 4, 4, generator=g)
    a = a - a.mean(dim=(2, 3, 4), keepdim=True) + 0.2 * torch.randn(8, 4, 1, 1, 1, generator=g)
    valid = torch.ones(8)
    loss = Fomo25Loss(Fomo25Config(align="mse")).eval()
    loss.align_term(a, a, valid), loss.align_mean_term(a, a, valid)  # statistics of the anatomy itself
    offset = a + 0.2  # the same small shift everywhere: contrast b
    per_position = float(loss.align_term(a, offset, valid))
    of_means = float(loss.align_mean_term(a, offset, valid))
    assert per_position < 0.01  # lost in the variation between positions
    assert of_means > 0.5  # as large as the variation between crop means
    assert float(loss.align_mean_term(a, a.clone(), valid)) < 1e-6
    # in the loss: the term appears with its weight and moves the encoder's gradient
    torch.manual_seed(0)
    model = DualLatentUNet(features=(4, 8, 16), latent=4)
    batch = _pair_batch()
    with_g, with_t = _grads(model, Fomo25Loss(Fomo25Config(w_align_mean=1.0)), batch)
    without_g, without_t = _grads(model, Fomo25Loss(Fomo25Config()), batch)
    assert "align_mean" in with_t and "align_mean" not in without_t and with_t["align_mean"] > 0
    enc = "encoder.stages.0.0.convs.0.conv.weight"
    assert not torch.allclose(with_g[enc], without_g[enc])
    with pytest.raises(ConfigError, match=">= 0"):
        Fomo25Config(w_align_mean=-1)


def test_reference_swap_takes_the_contrast_code_from_the_other_crop():
    class Painter(nn.Module):
        """forward_features: latents equal to the crop's mean; decode paints zs_mean + zc_mean everywhere."""

        def forward_features(self, x):
            m = x.mean(dim=(1, 2, 3, 4), keepdim=True)
            z = m.expand(-1, 2, 1, 1, 1).contiguous()
            return type("F", (), {"latents": {"mu_s": z, "logvar_s": z * 0, "mu_c": z, "logvar_c": z * 0}})()

        def decode(self, zs, zc):
            return (zs.mean(dim=(1, 2, 3, 4), keepdim=True) + zc.mean(dim=(1, 2, 3, 4), keepdim=True)).expand(
                -1, 1, 8, 8, 8
            )

    cfg = Fomo25Config(swap_contrast="reference", swap_anatomy="other", block=4, mask_ratio=0.01, w_kl=0)
    assert cfg.data_needs().reference_crop and not Fomo25Config().data_needs().reference_crop
    batch = cfg.example_batch(2, 8, {})
    assert {"x_a_ref", "x_b_ref"} <= set(batch)
    full = lambda v: torch.full((2, 1, 8, 8, 8), float(v))  # noqa: E731
    batch.update(x_a=full(1), x_b=full(2), x_a_ref=full(10), x_b_ref=full(20))
    loss = Fomo25Loss(cfg).eval()
    _, _, out = loss(Painter(), batch)
    # anatomy of a (~1) with the contrast code of b's other crop (~20): ~21, not a copy of x_b's own crop (~2 + 2)
    assert torch.allclose(out["swap"], torch.full_like(out["swap"], 21.0), atol=0.5)


def _train(model, loss_fn, batch, term, steps, lr=3e-3):
    """Adam on one fixed batch; the named term's value at the first and the last step."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    values = []
    for _ in range(steps):
        loss, terms, _ = loss_fn(model, batch)
        values.append(float(terms[term]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return values[0], values[-1]


def test_contrast_adversary_reverses_its_gradient_and_the_classifier_learns():
    from neurofm.objectives.fomo25 import reverse_gradient

    x = torch.randn(4, requires_grad=True)
    (reverse_gradient(x) * torch.arange(4.0)).sum().backward()
    assert torch.equal(x.grad, -torch.arange(4.0))  # identity forward, negated gradient backward
    cfg = Fomo25Config(w_adversary=1.0, w_contrast_id=1.0, w_swap=0, w_kl=0, w_align=0, w_repel=0)
    torch.manual_seed(0)
    model = DualLatentUNet(features=(4, 8, 16), latent=8, **cfg.model_kwargs({}, None, {}))
    loss_fn = Fomo25Loss(cfg)
    batch = cfg.example_batch(2, 16, {})
    batch["x_b"] = batch["x_b"] * 3 + 2  # the two "contrasts" differ, so a classifier can tell them
    batch["contrast_b"][1] = -1  # a contrast outside CONTRASTS is left out of both terms
    _, terms, _ = loss_fn(model, batch)
    assert {"adversary", "contrast_id"} <= set(terms)
    first, last = _train(model, loss_fn, batch, "contrast_id", steps=30)
    assert last < 0.5 * first  # the contrast code learns to name the contrast
    with pytest.raises(ConfigError, match="contrast_classes"):
        loss_fn(DualLatentUNet(features=(4, 8, 16), latent=8), batch)


def test_pooled_adversary_reads_each_crops_mean_anatomy_vector():
    cfg = Fomo25Config(w_adversary=2.0, adversary_pool="mean", w_swap=0, w_kl=0, w_align=0, w_repel=0)
    torch.manual_seed(0)
    model = DualLatentUNet(features=(4, 8, 16), latent=8, **cfg.model_kwargs({}, None, {}))
    mu_s, mu_c = torch.randn(4, 8, 2, 2, 2, requires_grad=True), torch.randn(4, 8, 2, 2, 2)
    batch = {"contrast_a": torch.tensor([0, 1]), "contrast_b": torch.tensor([2, -1])}  # -1: an unknown contrast
    terms: dict = {}
    total = Fomo25Loss(cfg).contrast_terms(model, mu_s, mu_c, batch, 2, False, terms)
    logits = model.adversary(mu_s.mean(dim=(2, 3, 4), keepdim=True)).flatten(1)
    expected = F.cross_entropy(logits[:3], torch.tensor([0, 1, 2]))  # the known contrasts, one value per crop
    assert torch.allclose(terms["adversary"], expected) and torch.allclose(total, 2.0 * expected)
    per_position: dict = {}
    Fomo25Loss(replace(cfg, adversary_pool="position")).contrast_terms(model, mu_s, mu_c, batch, 2, False, per_position)
    assert not torch.allclose(per_position["adversary"], expected)
    total.backward()  # the encoder side gets the reversed gradient: it moves to make the adversary wrong
    (grad,) = torch.autograd.grad(
        F.cross_entropy(model.adversary(mu_s.mean((2, 3, 4), True)).flatten(1)[:3], torch.tensor([0, 1, 2])), mu_s
    )
    assert torch.allclose(mu_s.grad, -2.0 * grad, atol=1e-6)
    with pytest.raises(ConfigError, match="adversary_pool"):
        Fomo25Config(adversary_pool="max")


def test_fit_linear_probe_is_the_analysis_probes_fit():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    g = torch.Generator().manual_seed(5)
    y = torch.randint(1, 4, (200,), generator=g) * 2  # labels 2, 4, 6: the classes come back sorted
    x = 0.03 + 5e-3 * torch.randn(200, 6, generator=g)  # class shares' scale: ~0.005 between crops
    x[:, :3] += 5e-3 * F.one_hot(y // 2 - 1, 3)
    mean, scale, weight, bias, classes, accuracy = fit_linear_probe(x, y)
    z = StandardScaler().fit_transform(x.double().numpy())
    ref = LogisticRegression(max_iter=2000).fit(z, y.numpy())
    assert classes.tolist() == [2, 4, 6]
    assert torch.allclose(weight, torch.from_numpy(ref.coef_), atol=5e-3)
    assert math.isclose(float(accuracy), ref.score(z, y.numpy()), abs_tol=0.01) and float(accuracy) > 0.6


def test_fit_linear_probe_without_a_floor_reads_a_channel_that_hardly_varies_as_the_analysis_probe_does():
    """A soft code's unused classes vary by ~1e-8 between scans; StandardScaler blows them up to unit variance and
    the analysis probe reads them. The floored critic does not; ``floor=0`` does, as the probe."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    g = torch.Generator().manual_seed(6)
    y = torch.randint(0, 3, (150,), generator=g)
    x = torch.empty(150, 4, dtype=torch.float64)
    x[:, :3] = 0.3 + 0.05 * torch.randn(150, 3, generator=g, dtype=torch.float64)  # used classes: no contrast
    x[:, 3] = 1e-6 + 1e-8 * (y.double() + 0.3 * torch.randn(150, generator=g, dtype=torch.float64))  # unused: tells
    *_, floored = fit_linear_probe(x, y)
    mean, scale, weight, _, _, exact = fit_linear_probe(x, y, floor=0.0)
    z = StandardScaler().fit_transform(x.numpy())
    ref = LogisticRegression(max_iter=2000).fit(z, y.numpy())
    assert float(floored) < 0.6 < 0.9 < float(exact)
    assert math.isclose(float(exact), ref.score(z, y.numpy()), abs_tol=0.02)
    assert torch.allclose(scale, x.std(0, unbiased=False), rtol=1e-9)
    assert torch.allclose(weight, torch.from_numpy(ref.coef_), atol=2e-2)
    constant = torch.cat([x, torch.full((150, 1), 0.5, dtype=torch.float64)], 1)
    assert fit_linear_probe(constant, y, floor=0.0)[1][-1] == 1.0  # a constant channel is left unscaled
    with pytest.raises(ConfigError, match="adversary_floor"):
        Fomo25Config(adversary_floor=-1.0)


def test_refitted_critic_reads_standardised_crop_means_and_pushes_them_together():
    cfg = Fomo25Config(w_adversary=1.0, adversary_pool="mean", adversary_fit="refit", adversary_refit=2)
    cfg = replace(cfg, adversary_buffer=64)
    assert "contrast_classes" not in cfg.model_kwargs({}, None, {})  # no adversary head: the critic is refitted
    g = torch.Generator().manual_seed(3)
    ids = torch.tensor([0, 1, 2, -1] * 8)  # -1: a crop of unknown contrast, never counted
    offset = torch.zeros(32, 4)
    offset[:, 0] = 1e-2 * ids.clamp_min(0).float()  # each contrast shifts class 0's share by 2x the spread
    loss = Fomo25Loss(cfg).train()

    def crops():
        return 0.25 + 5e-3 * torch.randn(32, 4, generator=g) + offset

    assert loss.refit_critic_term(crops(), ids) == 0  # nothing fitted yet (32 of 64 crops buffered)
    loss.refit_critic_term(crops(), ids)  # the buffer is full on the second call, which refits
    assert loss.critic_classes.tolist() == [0, 1, 2] and float(loss.critic_accuracy) > 0.8
    assert torch.allclose(loss.critic_prior, torch.full((3,), 1 / 3, dtype=torch.float64))
    m = crops().requires_grad_(True)
    value = loss.eval().refit_critic_term(m, ids)
    value.backward()
    assert value > 0.3
    # descending moves contrast 0's crops up class 0 and contrast 2's down, on average: together (each crop
    # goes to where the critic is unsure, whatever its contrast)
    step = -m.grad[:, 0]
    assert step[ids == 0].mean() > 0 and step[ids == 2].mean() < 0 and (m.grad[ids == -1] == 0).all()
    # the same crops with no contrast in them: the critic, refitted, reads little and the term is small
    blind = Fomo25Loss(replace(cfg, adversary_buffer=256)).train()
    for _ in range(10):
        last = blind.refit_critic_term(0.25 + 5e-3 * torch.randn(32, 4, generator=g), ids)
    assert float(blind.critic_accuracy) < 0.7 and last < value / 5
    # in the loss, a model without contrast heads trains with it; its accuracy is logged beside the term
    torch.manual_seed(0)
    model = DualLatentUNet(features=(4, 8, 16), latent=4, **cfg.model_kwargs({}, None, {}))
    assert model.adversary is None
    objective = Fomo25Loss(replace(cfg, adversary_buffer=8, adversary_refit=1))
    batch = _pair_batch()
    batch["contrast_a"], batch["contrast_b"] = torch.tensor([0, 2]), torch.tensor([1, 3])
    _, terms = _grads(model, objective, batch)
    assert terms["adversary"] == 0 and objective.critic_weight.numel() == 0  # 4 crops buffered of 8: no critic yet
    _, terms = _grads(model, objective, batch)  # the buffer is full: a critic is fitted and the term is scored
    assert objective.critic_classes.tolist() == [0, 1, 2, 3] and terms["adversary"] > 0
    assert 0 <= float(terms["critic_accuracy"]) <= 1
    with pytest.raises(ConfigError, match="adversary_pool=mean"):
        Fomo25Config(adversary_fit="refit")
    with pytest.raises(ConfigError, match="adversary_refit"):
        Fomo25Config(adversary_fit="refit", adversary_pool="mean", adversary_refit=0)


def test_whole_scan_critic_reads_scans_as_the_analysis_does_and_refits_on_the_current_encoder():
    from neurofm.analyze.embed import scan_features
    from neurofm.objectives.fomo25 import scan_vectors

    cfg = Fomo25Config(w_adversary=1.0, adversary_pool="mean", adversary_fit="scans", adversary_refit=2)
    cfg = replace(cfg, adversary_scans=8)
    assert cfg.data_needs().whole_scan and not Fomo25Config().data_needs().whole_scan
    assert "contrast_classes" not in cfg.model_kwargs({}, None, {})
    torch.manual_seed(0)
    model = DualLatentUNet(features=(4, 8, 16), latent=4, anatomy_code="categorical").eval()
    g = torch.Generator().manual_seed(4)
    scans = torch.randn(4, 1, 24, 20, 16, generator=g)
    # the analysis' whole-scan vector: windows of the patch tiling the scan, their anatomy vectors averaged
    with torch.no_grad():
        got = scan_vectors(model, scans, 16)
    for i in range(4):
        want = scan_features(model, scans[i, 0].numpy(), 16)[0]
        assert torch.allclose(got[i], torch.from_numpy(want), atol=1e-5)
    # scans of their own shapes, centre-padded with their darkest value into one canvas as the loader pads them
    # (one axis shorter than the patch): each read by its own windows, as the analysis reads the scan alone
    from neurofm.preprocess.transforms import pad_to_shape

    own = [(24, 20, 16), (19, 13, 16), (17, 18, 11)]
    vols = [torch.randn(s, generator=g).numpy() for s in own]
    canvas = torch.stack([torch.from_numpy(pad_to_shape(v, (24, 20, 16), float(v.min())))[None] for v in vols])
    with torch.no_grad():
        got = scan_vectors(model, canvas, 16, torch.tensor(own))
        tiled_canvas = scan_vectors(model, canvas, 16)
    for i, v in enumerate(vols):
        want = torch.from_numpy(scan_features(model, v, 16)[0])
        assert torch.allclose(got[i], want, atol=1e-5)
        if i:  # a smaller scan: the canvas' windows are not the analysis' windows
            assert not torch.allclose(tiled_canvas[i], want, atol=1e-3)
    with pytest.raises(ValueError, match="does not fit the canvas"):
        scan_vectors(model, canvas, 16, torch.tensor([(25, 20, 16)] * 3))
    loss = Fomo25Loss(cfg).train()
    ids = torch.tensor([0, 1, 2, -1])  # -1: unknown, never counted
    shift = torch.tensor([0.0, 1.0, 2.0, 0.0]).view(4, 1, 1, 1, 1)  # each contrast a brighter scan

    def batch():
        return torch.randn(4, 1, 24, 20, 16, generator=g) + shift

    assert loss.scan_critic_term(model, batch(), ids, 16) == 0  # 4 of 8 scans banked: no critic, no encoding
    assert loss.critic_weight.numel() == 0
    loss.scan_critic_term(model, batch(), ids, 16)  # the bank is full on the second call, which refits
    assert loss.critic_classes.tolist() == [0, 1, 2]
    # the critic is fitted on the bank as the current encoder reads it: change the encoder, refit, and its
    # standardisation is that of the new vectors
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        shapes = torch.tensor([(24, 20, 16), (20, 14, 12), (24, 20, 16), (18, 20, 16)])  # each scan's own shape
        loss.scan_critic_term(model, batch(), ids, 16, shapes)
        value_before = loss.scan_critic_term(model, batch(), ids, 16, shapes)  # the fourth call refits
        known = loss.critic_y >= 0
        assert torch.equal(loss.critic_shape, torch.cat([shapes, shapes]))  # the bank keeps the shapes
        fresh = scan_vectors(model, loss.critic_x, 16, loss.critic_shape)[known]
        canvas_read = scan_vectors(model, loss.critic_x, 16)[known]
    assert torch.allclose(loss.critic_mean, fresh.double().mean(0), atol=1e-5)
    assert not torch.allclose(loss.critic_mean, canvas_read.double().mean(0), atol=1e-5)
    assert value_before > 0
    # the term's gradient reaches the encoder, through the scans' windows
    model.zero_grad()
    value = loss.eval().scan_critic_term(model, batch(), ids, 16)
    value.backward()
    first_conv = next(p for n, p in model.named_parameters() if n.startswith("encoder") and p.dim() == 5)
    assert value > 0 and first_conv.grad is not None and first_conv.grad.abs().sum() > 0
    # in the loss: the batch's whole scans of the pair's first contrast, the critic's accuracy logged beside it
    objective = Fomo25Loss(replace(cfg, adversary_refit=1, adversary_scans=8))
    model.train()
    pair = _pair_batch()
    pair["contrast_a"], pair["contrast_b"] = torch.tensor([0, 2]), torch.tensor([1, 3])
    pair["scan_a"] = torch.randn(2, 1, 24, 20, 16, generator=g) + torch.tensor([0.0, 2.0]).view(2, 1, 1, 1, 1)
    for _ in range(3):
        _, terms = _grads(model, objective, pair)
        assert terms["adversary"] == 0  # 2, 4, 6 scans banked of 8: no critic yet
    _, terms = _grads(model, objective, pair)
    assert objective.critic_classes.tolist() == [0, 2] and terms["adversary"] > 0
    assert 0 <= float(terms["critic_accuracy"]) <= 1
    with pytest.raises(ConfigError, match="adversary_pool=mean"):
        Fomo25Config(adversary_fit="scans")
    with pytest.raises(ConfigError, match="adversary_scans"):
        Fomo25Config(adversary_fit="scans", adversary_pool="mean", adversary_scans=4)


def test_scan_means_term_reads_whole_scans_as_the_analysis_does_and_training_shrinks_it():
    from neurofm.objectives.fomo25 import scan_vectors

    cfg = Fomo25Config(w_scan_means=1.0)
    assert cfg.data_needs().whole_scan and not cfg.online_heads
    with pytest.raises(ConfigError, match="w_scan_means"):
        Fomo25Config(w_scan_means=-1.0)
    torch.manual_seed(0)
    model = DualLatentUNet(features=(4, 8, 16), latent=4, anatomy_code="categorical").eval()
    g = torch.Generator().manual_seed(5)
    ids = torch.tensor([0, 1, 2, -1])  # -1: unknown, never counted in a mean
    shift = torch.tensor([0.0, 1.0, 2.0, 0.0]).view(4, 1, 1, 1, 1)  # each contrast a brighter scan
    scans = torch.randn(4, 1, 24, 20, 16, generator=g) + shift
    shapes = torch.tensor([(24, 20, 16), (20, 14, 12), (24, 20, 16), (18, 20, 16)])
    # known answer on the first call: the running means are this batch's, the scale its per-channel variance
    loss = Fomo25Loss(cfg).train()
    value = loss.scan_means_term(model, scans, ids, 16, shapes)
    with torch.no_grad():
        v = scan_vectors(model, scans, 16, shapes).double()
    d = v[:3] - v[:3].mean(0)
    var = v.var(0)
    want = (d**2 / (var + 1e-3 * var.mean())).sum() / (3 * v.shape[1])
    assert float(value.detach()) == pytest.approx(float(want), rel=1e-4) and float(want) > 0
    assert loss.scan_seen[:3].all() and not loss.scan_seen[3:].any()
    assert loss.contrast_means.numel() == 0  # the crop term's estimates are its own
    assert "scan_means" in loss.running_state()["buffers"]
    # descending it brings the contrasts' whole-scan vectors together
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    values = []
    for _ in range(25):
        opt.zero_grad()
        term = loss.scan_means_term(model, scans, ids, 16, shapes)
        term.backward()
        opt.step()
        values.append(float(term))
    assert values[-1] < 0.3 * values[0], values
    # in the loss: the batch's whole scans of the pair's first contrast
    objective = Fomo25Loss(cfg)
    pair = _pair_batch()
    pair["contrast_a"], pair["contrast_b"] = torch.tensor([0, 2]), torch.tensor([1, 3])
    pair["scan_a"] = torch.randn(2, 1, 24, 20, 16, generator=g) + torch.tensor([0.0, 2.0]).view(2, 1, 1, 1, 1)
    _, terms = _grads(model, objective, pair)
    assert float(terms["scan_means"]) > 0 and objective.scan_seen.nonzero().view(-1).tolist() == [0, 2]


def test_running_state_carries_the_estimates_into_a_fresh_objective_and_refuses_foreign_names():
    g = torch.Generator().manual_seed(3)
    anatomy = torch.randn(8, 4, 2, 2, 2, generator=g)
    ids = torch.tensor([0, 1, 2, 3] * 2)
    cfg = Fomo25Config(w_contrast_means=1.0)
    trained = Fomo25Loss(cfg)
    for _ in range(3):  # other batches, whose contrasts sit apart
        trained.contrast_means_term(torch.randn(8, 4, 2, 2, 2, generator=g) + 3 * ids.view(-1, 1, 1, 1, 1), ids)
    trained.critic_calls, trained.critic_written = 7, 56
    blank = Fomo25Loss(cfg).contrast_means_term(anatomy, ids)  # an objective that estimates them again
    fresh = Fomo25Loss(cfg)
    fresh.load_running_state(trained.running_state())
    assert torch.equal(fresh.contrast_means, trained.contrast_means)
    assert torch.equal(fresh.contrast_seen, trained.contrast_seen)
    assert (fresh.critic_calls, fresh.critic_written) == (7, 56)
    restored = fresh.contrast_means_term(anatomy, ids)
    assert restored == trained.contrast_means_term(anatomy, ids) > 0
    assert abs(float(restored - blank)) > 1e-3
    assert "contrast_means" not in trained.state_dict()  # the estimates travel beside the weights, not in them
    with pytest.raises(ConfigError, match="lacks"):
        fresh.load_running_state({"buffers": {"weights": torch.zeros(1)}, "critic_calls": 0, "critic_written": 0})


def test_contrast_means_term_pulls_each_contrasts_mean_to_the_common_one():
    g = torch.Generator().manual_seed(2)
    anatomy = torch.randn(8, 4, 2, 2, 2, generator=g)
    ids = torch.tensor([0, 1] * 4)
    offset = torch.zeros(8, 4, 1, 1, 1)
    offset[ids == 0] = 0.5  # contrast 0 sits above, contrast 1 below
    offset[ids == 1] = -0.5
    loss = Fomo25Loss(Fomo25Config(w_contrast_means=1.0))
    for _ in range(3):
        loss.contrast_means_term(anatomy + offset, ids)  # running means and scale from a few batches
    shifted = (anatomy + offset).requires_grad_(True)
    value = loss.contrast_means_term(shifted, ids)
    value.backward()
    assert value > 0.1
    # descending the gradient moves contrast 0's crops down and contrast 1's up: towards one mean
    step = -shifted.grad.flatten(2).mean(2).mean(1)
    assert (step[ids == 0] < 0).all() and (step[ids == 1] > 0).all()
    same = Fomo25Loss(Fomo25Config(w_contrast_means=1.0))
    for _ in range(3):
        last = same.contrast_means_term(anatomy[:1].expand(8, -1, -1, -1, -1), ids)
    assert last < 1e-8  # every contrast has the same mean: nothing to pull
    # an unknown contrast (-1) is left out; in the loss the term appears and moves the encoder
    assert torch.isfinite(loss.contrast_means_term(anatomy, torch.full((8,), -1)))
    torch.manual_seed(0)
    model = DualLatentUNet(features=(4, 8, 16), latent=4)
    batch = _pair_batch()
    batch["contrast_a"], batch["contrast_b"] = torch.tensor([0, 2]), torch.tensor([1, 3])
    _, terms = _grads(model, Fomo25Loss(Fomo25Config(w_contrast_means=1.0)), batch)
    assert "contrast_means" in terms and torch.isfinite(terms["contrast_means"])


def test_crop_mean_terms_do_not_shrink_with_the_latents_scale():
    # a categorical anatomy code's crop means are class probabilities averaged over a crop: their variance
    # is ~4e-7 per class, far below an absolute floor of 1e-4 that once made these terms ~250x weaker for
    # that code than their weight said
    g = torch.Generator().manual_seed(4)
    ids = torch.tensor([0, 1] * 8)
    a = torch.randn(16, 4, 2, 2, 2, generator=g)
    b = a + 0.5 * (1.0 - 2.0 * ids.float())[:, None, None, None, None]  # a contrast offset per class
    valid = torch.ones(16)
    values = {}
    for scale in (1.0, 1e-3):
        for metric in ("diagonal", "whitened"):
            loss = Fomo25Loss(Fomo25Config(w_contrast_means=1.0, contrast_means_metric=metric))
            for _ in range(3):
                loss.contrast_means_term(scale * b, ids)
            values[metric, scale] = float(loss.contrast_means_term(scale * b, ids))
        mean = Fomo25Loss(Fomo25Config(align="mse")).eval()
        mean.align_mean_term(scale * a, scale * a, valid)
        values["align_mean", scale] = float(mean.align_mean_term(scale * a, scale * b, valid))
    for term in ("diagonal", "whitened", "align_mean"):
        assert values[term, 1.0] > 0.1
        assert values[term, 1e-3] == pytest.approx(values[term, 1.0], rel=1e-3)


def test_whitened_contrast_means_sees_an_offset_along_a_direction_in_which_crop_means_hardly_vary():
    # crop means that vary along (1, 1, 1, 1) only, and a contrast offset of 1/10 of that spread along
    # (1, -1, 0, 0): small beside each channel's variance, yet a linear probe separates it perfectly
    g = torch.Generator().manual_seed(3)
    ids = torch.tensor([0, 1] * 8)
    along = torch.randn(8, 1, generator=g).repeat_interleave(2, 0) * torch.ones(1, 4)  # the same for both contrasts
    offset = 0.1 * torch.tensor([1.0, -1.0, 0.0, 0.0]) * (1.0 - 2.0 * ids.float())[:, None]
    means = (along + offset)[:, :, None, None, None].expand(-1, -1, 2, 2, 2)
    values = {}
    for metric in ("diagonal", "whitened"):
        loss = Fomo25Loss(Fomo25Config(w_contrast_means=1.0, contrast_means_metric=metric))
        for _ in range(3):
            loss.contrast_means_term(means, ids)
        values[metric] = float(loss.contrast_means_term(means, ids))
    assert values["diagonal"] < 0.02  # 0.01 / ~1 per channel
    assert values["whitened"] > 0.5  # the offset is most of what varies along (1, -1, 0, 0)
    with pytest.raises(ConfigError, match="contrast_means_metric"):
        Fomo25Config(contrast_means_metric="full")
    with pytest.raises(ConfigError, match="contrast_means_ridge"):
        Fomo25Config(contrast_means_ridge=0.0)


def test_contrast_terms_read_an_extra_unmasked_encoding_when_asked():
    torch.manual_seed(0)
    model = DualLatentUNet(features=(4, 8, 16), latent=4)
    batch = _pair_batch()
    batch["contrast_a"], batch["contrast_b"] = torch.tensor([0, 2]), torch.tensor([1, 3])
    inputs = []
    hook = model.encoder.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach()))
    for where in ("masked", "clean"):
        inputs.clear()
        cfg = Fomo25Config(w_contrast_means=1.0, contrast_means_metric="whitened", contrast_input=where)
        _, terms = _grads(model, Fomo25Loss(cfg), batch)
        assert torch.isfinite(terms["contrast_means"])
        x = torch.cat([batch["x_a"], batch["x_b"]])
        assert len(inputs) == (2 if where == "clean" else 1)
        assert not torch.equal(inputs[0], x)  # the other terms read masked scans
        if where == "clean":
            assert torch.equal(inputs[1], x)
    hook.remove()


def test_fomo25_anatomy_anchor_learns_the_subjects_volumes_from_either_contrast():
    cfg = Fomo25Config(w_anatomy=1.0, w_swap=0, w_kl=0, w_align=0, w_repel=0)
    extra = {"regions": ["a", "b", "c"]}
    kwargs = cfg.model_kwargs({}, None, extra)
    assert kwargs["anatomy_outputs"] == 3 and cfg.data_needs().volumes
    torch.manual_seed(0)
    model = DualLatentUNet(features=(4, 8, 16), latent=8, **kwargs)
    batch = cfg.example_batch(2, 16, extra)
    # two subjects whose volumes point in opposite directions; their images differ in structure (one has
    # a large bright region), which instance normalisation keeps, unlike a plain offset
    batch["volumes"] = torch.tensor([[1.0, -1.0, 0.5], [-1.0, 1.0, -0.5]])
    for name in ("x_a", "x_b"):
        batch[name][1, :, :8] += 3.0
    loss_fn = Fomo25Loss(cfg)
    first, last = _train(model, loss_fn, batch, "anatomy", steps=40)
    assert last < 0.3 * first  # 1 - cosine, summed over the pair's two scans
    batch["has_volumes"][:] = False  # a subject without volumes adds nothing
    assert float(loss_fn(model, batch)[1]["anatomy"]) == 0.0
    model.reset_head("reg", 1)  # a pretext head: dropped downstream
    assert model.anatomy_projector is None
    with pytest.raises(ConfigError, match="anatomy_outputs"):
        loss_fn(DualLatentUNet(features=(4, 8, 16), latent=8), batch)


@pytest.mark.parametrize(
    ("health_norm", "health_pool", "health_slots"),
    [(False, 0, False), (True, 0, False), (True, 4, False), (True, 4, True)],
)
def test_fomo25_health_pretext_learns_the_pools_labels_from_clean_scans_and_is_dropped_downstream(
    health_norm, health_pool, health_slots
):
    cfg = Fomo25Config(w_health=1.0, w_swap=0, w_kl=0, w_align=0, w_repel=0)
    kwargs = cfg.model_kwargs({}, None, {})
    assert kwargs == {"health_classes": 2} and "health_classes" not in Fomo25Config().model_kwargs({}, None, {})
    torch.manual_seed(0)
    model = DualLatentUNet(
        features=(4, 8, 16),
        latent=8,
        health_norm=health_norm,
        health_pool=health_pool,
        health_slots=health_slots,
        **kwargs,
    )
    assert model.config.get("health_norm", False) is health_norm and model.config.get("health_pool", 0) == health_pool
    assert model.config.get("health_slots", False) is health_slots
    head = {(False, 0): nn.Linear, (True, 0): nn.Sequential, (True, 4): PooledHealthHead}[(health_norm, health_pool)]
    assert type(model.health_head) is head
    batch = cfg.example_batch(4, 16, {})
    # the patients (1) carry a bright block in both scans of the pair: a lesion, which the mask often hides
    batch["health"] = torch.tensor([0, 1, 0, 1])
    for name in ("x_a", "x_b"):
        batch[name][1::2, :, 4:8, 4:8, 4:8] += 4.0
    loss_fn = Fomo25Loss(cfg)
    inputs = []
    hook = model.encoder.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach()))
    loss_fn(model, batch)
    hook.remove()
    assert len(inputs) == 2 and torch.equal(inputs[1], torch.cat([batch["x_a"], batch["x_b"]]))  # clean scans
    first, last = _train(model, loss_fn, batch, "health", steps=40, lr=1e-2)
    assert first > 0.5 and last < 0.2 * first  # cross-entropy from about ln 2
    unknown = {**batch, "health": torch.full((4,), -1)}  # sessions without a label add nothing
    assert float(loss_fn(model, unknown)[1]["health"]) == 0.0
    model.reset_head("cls", 2)  # a pretext head: dropped downstream, and never transferred
    assert model.health_head is None and "health_head." in DualLatentUNet.pretext_prefixes
    with pytest.raises(ConfigError, match="health_classes"):
        loss_fn(DualLatentUNet(features=(4, 8, 16), latent=8), batch)
    with pytest.raises(ConfigError, match="w_health"):
        Fomo25Config(w_health=-1.0)
    with pytest.raises(ConfigError, match="health_norm"):
        DualLatentUNet(features=(4, 8, 16), latent=8, health_norm=True)
    with pytest.raises(ConfigError, match="health_pool"):
        DualLatentUNet(features=(4, 8, 16), latent=8, health_pool=4)
    with pytest.raises(ConfigError, match="health_slots"):
        DualLatentUNet(features=(4, 8, 16), latent=8, health_slots=True)


def test_the_pooled_health_head_pools_each_stage_by_a_convolution_and_gelu_then_the_mean():
    torch.manual_seed(0)
    head = PooledHealthHead((3, 5), classes=2, channels=4).eval()
    maps = [torch.randn(4, 3, 6, 6, 6), torch.randn(4, 5, 3, 3, 3)]  # two pairs: rows 0-1 first scans, 2-3 second
    pooled = torch.cat([F.gelu(conv(m)).mean(dim=(2, 3, 4)) for conv, m in zip(head.pool, maps, strict=True)], dim=1)
    want = head.out(torch.cat([pooled[:2], pooled[2:]], dim=1))
    assert torch.allclose(head(maps), want, atol=1e-5)  # the channels-last linear form is the convolution
    swapped = [torch.cat([m[2:], m[:2]]) for m in maps]  # the pair's two scans side by side, not summed
    assert not torch.allclose(head(swapped), head(maps))


def test_pair_slots_put_each_scan_in_its_contrasts_slot_so_the_pairs_order_does_not_matter():
    v = torch.arange(10.0).view(5, 2)[:4]  # two pairs: rows 0-1 their first scans, rows 2-3 their second
    ids = torch.tensor([0, 3, 3, 3])  # pair 0: T1w and FLAIR; pair 1: FLAIR twice (a session with one scan)
    want = torch.tensor([[0.0, 1, 0, 0, 0, 0, 4, 5, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 4, 5, 0, 0, 0, 0]])
    assert torch.equal(pair_slots(v, ids, 6), want)
    assert torch.equal(pair_slots(v, torch.tensor([-1, 3, 2, 3]), 6)[0, 10:], v[0])  # another name: the last slot
    torch.manual_seed(0)
    head = PooledHealthHead((3, 5), classes=2, channels=4, slots=HEALTH_SLOTS).eval()
    maps = [torch.randn(4, 3, 6, 6, 6), torch.randn(4, 5, 3, 3, 3)]
    ids = torch.tensor([0, 1, 3, 2])
    swapped = [torch.cat([m[2:], m[:2]]) for m in maps]  # first and second scans exchanged, with their contrasts
    assert torch.allclose(head(swapped, torch.cat([ids[2:], ids[:2]])), head(maps, ids), atol=1e-6)
    assert not torch.allclose(head(maps, torch.tensor([3, 2, 0, 1])), head(maps, ids))  # the slot says the contrast
    with pytest.raises(ConfigError, match="contrast"):
        head(maps)


def test_running_standardise_uses_cumulative_then_exponential_statistics_and_passes_the_gradient():
    torch.manual_seed(0)
    norm = RunningStandardise(3, momentum=0.25)
    batches = [torch.randn(4, 3) * 0.5 + torch.tensor([10.0, -3.0, 0.0]) for _ in range(6)]
    norm(batches[0])  # the first batch sets the statistics outright
    assert torch.allclose(norm.mean, batches[0].mean(0)) and torch.allclose(norm.var, batches[0].var(0, unbiased=False))
    norm(batches[1])  # then a cumulative average (rate 1/2 > momentum)
    assert torch.allclose(norm.mean, (batches[0].mean(0) + batches[1].mean(0)) / 2)
    for b in batches[2:]:
        norm(b)
    assert int(norm.seen) == 6
    want = batches[0].mean(0)
    for b, rate in zip(batches[1:], (1 / 2, 1 / 3, 1 / 4, 1 / 4, 1 / 4), strict=True):  # then the momentum, 1/4
        want = want + rate * (b.mean(0) - want)
    assert torch.allclose(norm.mean, want)
    norm.eval()
    frozen = norm.mean.clone()
    x = torch.tensor([[10.0, -3.0, 0.0]], requires_grad=True)
    y = norm(x)
    assert torch.equal(norm.mean, frozen)  # evaluation leaves the statistics as they stand
    assert torch.allclose(y, (x - norm.mean) / norm.var.sqrt())
    y.sum().backward()
    assert torch.allclose(x.grad, norm.var.rsqrt().unsqueeze(0))  # no gradient into the statistics
    assert float(norm(torch.full((1, 3), 1e6)).max()) == 6.0  # clipped


def test_a_standardised_health_head_learns_a_small_signal_on_a_large_offset_where_a_plain_one_does_not():
    """Why ``health_norm``: crop-averaged encoder stages differ between scans by little around large shared
    offsets; AdamW's steps on a plain linear layer move its logits by the offsets, not by the signal."""
    final = {}
    for norm in (False, True):
        torch.manual_seed(0)
        head = nn.Sequential(RunningStandardise(32), nn.Linear(32, 2)) if norm else nn.Linear(32, 2)
        opt = torch.optim.AdamW(head.parameters(), lr=2e-3)
        offset, direction = 5 + 10 * torch.rand(32), torch.randn(32)
        losses = []
        for _ in range(400):
            y = torch.randint(0, 2, (4,))
            x = offset + 0.02 * torch.randn(4, 32) + 0.02 * (2 * y[:, None] - 1) * direction
            loss = F.cross_entropy(head(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        final[norm] = sum(losses[-100:]) / 100
    assert final[True] < 0.1 and final[False] > 0.5  # ln 2 = 0.69: the plain layer stays near a coin


def test_categorical_anatomy_code_is_a_distribution_sampled_in_training_without_kl():
    torch.manual_seed(0)
    model = DualLatentUNet(features=(4, 8, 16), latent=5, anatomy_code="categorical", anatomy_temperature=0.5)
    assert model.config["anatomy_code"] == "categorical" and "anatomy_code" not in DualLatentUNet().config
    lat = model.forward_features(torch.randn(2, 1, 16, 16, 16)).latents
    assert "logvar_s" not in lat and lat["logits_s"].shape == lat["mu_s"].shape == (2, 5, 4, 4, 4)
    assert torch.allclose(lat["mu_s"].sum(1), torch.ones(2, 4, 4, 4), atol=1e-5)  # class probabilities
    assert torch.allclose(lat["mu_s"], torch.softmax(lat["logits_s"] / 0.5, dim=1))
    with pytest.raises(ConfigError, match="anatomy_code"):
        DualLatentUNet(anatomy_code="hard")
    with pytest.raises(ConfigError, match="anatomy_temperature"):
        DualLatentUNet(anatomy_temperature=0.0)

    # the KL is the contrast latent's alone: the same with and without the anatomy posterior's share
    cfg = Fomo25Config(w_swap=0, w_align=0, w_repel=0)
    batch = _pair_batch()
    torch.manual_seed(1)
    _, terms, _ = Fomo25Loss(cfg)(model, batch, progress=20.0)
    torch.manual_seed(1)
    masks = block_mask(4, (16, 16, 16), cfg.block, cfg.mask_ratio)
    x = torch.cat([batch["x_a"], batch["x_b"]]).masked_fill(masks, 0.0)
    lat = model.forward_features(x).latents
    assert torch.allclose(terms["kl"], kl_divergence(lat["mu_c"], lat["logvar_c"]).mean(), rtol=1e-4)

    # training decodes Gumbel-softmax samples (random, on the simplex); evaluation the probabilities
    seen = []

    class Spy(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.anatomy_temperature = inner, inner.anatomy_temperature

        def forward_features(self, x):
            return self.inner.forward_features(x)

        def decode(self, zs, zc):
            seen.append(zs.detach())
            return self.inner.decode(zs, zc)

    def masked_mu(seed):  # the anatomy probabilities of the masked crops a call with this seed encodes
        torch.manual_seed(seed)
        m = block_mask(4, (16, 16, 16), cfg.block, cfg.mask_ratio)
        return model.forward_features(torch.cat([batch["x_a"], batch["x_b"]]).masked_fill(m, 0.0)).latents["mu_s"]

    loss = Fomo25Loss(cfg)
    for mode in ("train", "eval"):
        getattr(loss, mode)()
        torch.manual_seed(2)
        loss(Spy(model), batch)
        zs, mu = seen[-1][:2], masked_mu(2).detach()[:2]
        assert torch.allclose(zs.sum(1), torch.ones_like(zs[:, 0]), atol=1e-5)
        assert torch.allclose(zs, mu, atol=1e-6) == (mode == "eval")

    # and it learns: reconstruction falls on a fixed batch
    first, last = _train(model, Fomo25Loss(Fomo25Config()), batch, "rec", 40)
    assert last < 0.8 * first


def test_onehot_anatomy_code_is_the_most_likely_class_with_the_softmax_gradient():
    torch.manual_seed(0)
    model = DualLatentUNet(features=(4, 8, 16), latent=5, anatomy_code="onehot", contrast_code="global")
    assert model.config["anatomy_code"] == "onehot"
    x = torch.randn(2, 1, 16, 16, 16)
    lat = model.forward_features(x).latents
    probs = torch.softmax(lat["logits_s"] / model.anatomy_temperature, dim=1)
    hard = torch.nn.functional.one_hot(probs.argmax(1), 5).movedim(-1, 1).float()
    # a one-hot vector at every position, exactly: (1 + p) - p is off by up to 6e-8 for a quarter of p in float32,
    # noise that a standardising probe or critic blows up to unit variance
    assert torch.equal(lat["mu_s"], hard)
    # straight through: the gradient reaching the logits is the softmax's
    w = torch.randn_like(probs)
    (g_hard,) = torch.autograd.grad((lat["mu_s"] * w).sum(), lat["logits_s"], retain_graph=True)
    (g_soft,) = torch.autograd.grad((probs * w).sum(), lat["logits_s"])
    assert g_hard.abs().sum() > 0 and torch.allclose(g_hard, g_soft, atol=1e-6)
    # in training the decoder gets hard Gumbel-softmax samples: one-hot, not always the most likely class
    seen = []
    decode = model.decode
    model.decode = lambda zs, zc: (seen.append(zs.detach()), decode(zs, zc))[1]
    Fomo25Loss(Fomo25Config(swap_contrast="reference", swap_anatomy="other")).train()(
        model, Fomo25Config(swap_contrast="reference").example_batch(2, 16, {})
    )
    zs = seen[0]
    assert torch.equal(zs.sum(1), torch.ones_like(zs[:, 0])) and set(zs.unique().tolist()) == {0.0, 1.0}
    del model.decode
    # and it learns: reconstruction falls on a fixed batch
    first, last = _train(model, Fomo25Loss(Fomo25Config()), _pair_batch(), "rec", 40)
    assert last < 0.8 * first


def test_normalised_anatomy_logits_leave_the_codes_confidence_to_the_temperature():
    torch.manual_seed(0)
    model = DualLatentUNet(features=(4, 8, 16), latent=5, anatomy_code="categorical", anatomy_logit_norm=True)
    assert model.config["anatomy_logit_norm"] is True and "anatomy_logit_norm" not in DualLatentUNet().config
    x = torch.randn(2, 1, 16, 16, 16)
    lat = model.forward_features(x).latents
    logits = lat["logits_s"]  # standardised over the classes at every position
    assert torch.allclose(logits.mean(1), torch.zeros_like(logits[:, 0]), atol=1e-5)
    assert torch.allclose(logits.var(1, unbiased=False), torch.ones_like(logits[:, 0]), atol=1e-3)
    assert torch.allclose(lat["mu_s"], torch.softmax(logits / model.anatomy_temperature, dim=1), atol=1e-6)
    # a head that says the same thing more loudly gives the same code; without the switch it does not
    plain = DualLatentUNet(features=(4, 8, 16), latent=5, anatomy_code="categorical")
    plain.load_state_dict(model.state_dict())
    before = plain.forward_features(x).latents["mu_s"]
    with torch.no_grad():
        for m in (model, plain):
            m.subject_head.weight.mul_(3.0), m.subject_head.bias.mul_(3.0)
    assert (model.forward_features(x).latents["mu_s"] - lat["mu_s"]).abs().max() < 2e-3  # layer_norm's eps
    assert (plain.forward_features(x).latents["mu_s"] - before).abs().max() > 0.05
    with pytest.raises(ConfigError, match="anatomy_logit_norm"):
        DualLatentUNet(anatomy_logit_norm=True)
    first, last = _train(model, Fomo25Loss(Fomo25Config()), _pair_batch(), "rec", 40)
    assert last < 0.8 * first


def test_film_model_trains_under_the_reference_swap_and_every_decoder_stage_reads_the_code():
    torch.manual_seed(0)
    model = DualLatentUNet(features=(4, 8, 16), latent=5, contrast_code="global", contrast_injection="film")
    cfg = Fomo25Config(swap_contrast="reference", swap_anatomy="other")
    batch = cfg.example_batch(2, 16, {})
    grads, terms = _grads(model, Fomo25Loss(cfg), batch)
    assert terms["swap"] > 0
    for i in range(len(model.decoder["blocks"])):
        g = grads[f"decoder.blocks.{i}.film.weight"]
        assert torch.isfinite(g).all() and g.abs().sum() > 0
    first, last = _train(model, Fomo25Loss(cfg), batch, "rec", 40)
    assert last < 0.8 * first


def test_contrast_nce_known_answers_invalid_scans_left_out_and_it_learns():
    t = 0.5
    eye = torch.eye(8)
    # [a, b, a_ref, b_ref] for 2 pairs: each scan's two crops share a code, the four scans are orthogonal
    codes = torch.cat([eye[:2], eye[2:4], eye[:2], eye[2:4]])[:, :, None, None, None]  # (8, 8, 1, 1, 1)
    valid = torch.ones(2)
    # each anchor: the positive at 1/t, six negatives at 0
    assert contrast_nce(codes, valid, t) == pytest.approx(math.log(1 + 6 * math.exp(-1 / t)), rel=1e-5)
    same = torch.ones(8, 3)  # every code alike: the positive is one of seven equal choices
    assert contrast_nce(same, valid, t) == pytest.approx(math.log(7), rel=1e-5)
    # the second scan of an invalid pair is neither an anchor nor a negative: its codes do not matter
    half = torch.tensor([1.0, 0.0])
    moved = codes.clone()
    moved[[3, 7]] = torch.randn(2, 8, 1, 1, 1)
    assert contrast_nce(moved, half, t) == pytest.approx(float(contrast_nce(codes, half, t)), rel=1e-6)
    assert contrast_nce(codes, half, t) == pytest.approx(math.log(1 + 4 * math.exp(-1 / t)), rel=1e-5)
    # in the objective: the term is there, moves the contrast head, and falls when trained
    with pytest.raises(ConfigError, match="swap_contrast=reference"):
        Fomo25Config(w_contrast_nce=1.0)
    with pytest.raises(ConfigError, match="contrast_nce_temperature"):
        Fomo25Config(contrast_nce_temperature=0.0)
    torch.manual_seed(0)
    model = DualLatentUNet(features=(4, 8, 16), latent=5, contrast_code="global", contrast_injection="film")
    cfg = Fomo25Config(swap_contrast="reference", swap_anatomy="other", w_contrast_nce=1.0, mask_ratio=0.01)
    batch = cfg.example_batch(2, 16, {})
    batch["x_b"] = batch["x_b"] * 3 + 1  # the two scans of a session differ in contrast
    batch["x_b_ref"] = batch["x_b_ref"] * 3 + 1
    grads, terms = _grads(model, Fomo25Loss(cfg), batch)
    off, _ = _grads(model, Fomo25Loss(Fomo25Config(swap_contrast="reference", swap_anatomy="other")), batch)
    assert "contrast_nce" in terms
    key = next(k for k in grads if k.startswith("contrast_head") and k.endswith("weight"))
    assert not torch.allclose(grads[key], off[key])
    first, last = _train(model, Fomo25Loss(cfg), batch, "contrast_nce", 40)
    assert last < 0.7 * first


def test_class_usage_known_answers_needs_a_categorical_code_and_spreads_a_collapsed_code():
    k = 8
    uniform = torch.full((2, k, 2, 2, 2), 1.0 / k)
    assert float(class_usage(uniform)) == pytest.approx(0.0, abs=1e-6)
    one = torch.zeros(2, k, 2, 2, 2)
    one[:, 3] = 1.0
    assert float(class_usage(one)) == pytest.approx(1.0, abs=1e-6)
    # every position sure of its class, half the positions in class 0 and half in class 1: H = log 2
    split = torch.zeros(2, k, 2, 2, 2)
    split[0, 0], split[1, 1] = 1.0, 1.0
    assert float(class_usage(split)) == pytest.approx(1.0 - math.log(2) / math.log(k), rel=1e-6)
    # it reads the batch's marginal, not each position's entropy: the same marginal, the same value
    assert float(class_usage(torch.full((2, k, 2, 2, 2), 0.0).index_fill(1, torch.tensor([0, 1]), 0.5))) == (
        pytest.approx(float(class_usage(split)), rel=1e-6)
    )
    with pytest.raises(ConfigError, match="w_anatomy_usage"):
        Fomo25Config(w_anatomy_usage=-1.0)
    batch = _pair_batch()
    with pytest.raises(ConfigError, match="categorical"):
        Fomo25Loss(Fomo25Config(w_anatomy_usage=1.0))(DualLatentUNet(features=(4, 8, 16), latent=4), batch)

    # in the objective: a code pushed onto one class spreads again under the term, and only under it
    def collapsed():
        torch.manual_seed(0)
        model = DualLatentUNet(features=(4, 8, 16), latent=k, anatomy_code="categorical")
        with torch.no_grad():
            head = model.subject_head
            head.bias[:k] = 0.0
            head.bias[0] = 6.0  # the anatomy logits: class 0 far ahead everywhere
        return model

    cfg = Fomo25Config(w_anatomy_usage=1.0, w_swap=0, w_align=0, w_repel=0, w_kl=0)
    model = collapsed()
    first, last = _train(model, Fomo25Loss(cfg), batch, "anatomy_usage", 40, lr=1e-2)
    assert first > 0.9 and last < 0.5 * first
    control = collapsed()
    opt = torch.optim.Adam(control.parameters(), lr=1e-2)
    plain = Fomo25Loss(Fomo25Config(w_swap=0, w_align=0, w_repel=0, w_kl=0))
    for _ in range(40):
        loss, terms, _ = plain(control, batch)
        assert "anatomy_usage" not in terms
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        kept = class_usage(control.forward_features(torch.cat([batch["x_a"], batch["x_b"]])).latents["mu_s"])
    assert float(kept) > 2 * last


def test_class_agreement_known_answers_needs_a_categorical_code_and_brings_the_classes_together():
    k = 8
    sure = torch.full((2, k, 2, 2, 2), -30.0)
    sure[:, 3] = 0.0  # log-probabilities: class 3 everywhere, with (all but) certainty
    assert class_agreement(sure, sure).tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    uniform = torch.full((2, k, 2, 2, 2), -math.log(k))
    assert class_agreement(uniform, uniform).tolist() == pytest.approx([1.0, 1.0], rel=1e-6)
    # a sure of class 3, b uniform: a -> b costs log K, b -> a costs (log K + 7 * 30) / K ... over log K
    half = 0.5 * (math.log(k) + (7 * 30.0) / k) / math.log(k)
    assert class_agreement(sure, uniform).tolist() == pytest.approx([half, half], rel=1e-5)
    assert class_agreement(uniform, sure).tolist() == pytest.approx([half, half], rel=1e-5)
    # sure of different classes costs far more than agreeing
    other = torch.full((2, k, 2, 2, 2), -30.0)
    other[:, 5] = 0.0
    assert float(class_agreement(sure, other)[0]) > 10
    with pytest.raises(ConfigError, match="align should be"):
        Fomo25Config(align="classe")
    batch = _pair_batch()
    with pytest.raises(ConfigError, match="categorical"):
        Fomo25Loss(Fomo25Config(align="classes"))(DualLatentUNet(features=(4, 8, 16), latent=4), batch)

    # in the objective: on two contrasts of one anatomy the term falls, and the most likely classes agree
    # at more positions than when training without it
    batch["x_b"] = 1.0 - 2.0 * batch["x_a"].tanh()  # another contrast of the same anatomy

    def agreement(model):
        with torch.no_grad():
            p = model.forward_features(torch.cat([batch["x_a"], batch["x_b"]])).latents["mu_s"].argmax(1)
        return float((p[:2] == p[2:]).float().mean())

    cfg = dict(w_swap=0, w_repel=0, w_kl=0, mask_ratio=0.01)
    torch.manual_seed(0)
    model = DualLatentUNet(features=(4, 8, 16), latent=k, anatomy_code="categorical")
    first, last = _train(model, Fomo25Loss(Fomo25Config(align="classes", w_align=1.0, **cfg)), batch, "align", 60)
    assert last < 0.5 * first
    torch.manual_seed(0)
    control = DualLatentUNet(features=(4, 8, 16), latent=k, anatomy_code="categorical")
    _train(control, Fomo25Loss(Fomo25Config(w_align=0.0, **cfg)), batch, "rec", 60)
    assert agreement(model) > agreement(control)


class _FixedCode(nn.Module):
    """A dual-latent stand-in on a 4x4x4 grid of 4-voxel cells (16³ crops) whose categorical anatomy code is a fixed
    map of places, ``"place"`` (a class per parity pattern of the position) or ``"mirrored place"`` (edge or inner
    along each axis: the same under every mirror of the crop), or the crop's cell means rounded to the nearest class
    (``"image"``); with a global contrast code and a decoder."""

    downsampling = 4

    def __init__(self, code: str, k: int = 8):
        super().__init__()
        self.code, self.k = code, k
        self.scale = nn.Parameter(torch.ones(()))

    def forward_features(self, x):
        n, i = x.shape[0], torch.arange(4)
        if self.code == "image":
            logits = F.avg_pool3d(x, 4)
        else:
            bit = i % 2 if self.code == "place" else ((i == 1) | (i == 2)).long()
            logits = (bit.view(4, 1, 1) + 2 * bit.view(1, 4, 1) + 4 * bit.view(1, 1, 4)).float()
            logits = logits.expand(n, 1, 4, 4, 4)
        logits = 30.0 * self.scale * -(logits - torch.arange(self.k, dtype=x.dtype).view(1, -1, 1, 1, 1)).abs()
        lat = {"logits_s": logits, "mu_s": logits.softmax(1), "mu_c": torch.zeros(n, 2), "logvar_c": torch.zeros(n, 2)}
        return SimpleNamespace(latents=lat)

    def decode(self, zs, zc):
        return F.interpolate(zs[:, :1], scale_factor=4) * self.scale


def test_second_view_moves_only_the_second_scan_and_its_undo_maps_input_and_latent_grid_back():
    torch.manual_seed(3)
    for flip, shift in ((True, False), (False, True), (True, True)):
        view = None
        while view is None:
            view = Fomo25Loss.second_view(8, 2, (16, 16, 16), 4, flip, shift, "cpu")
        apply, undo = view
        t = torch.randn(8, 1, 16, 16, 16)
        moved = apply(t)
        first, second = [0, 1, 4, 5], [2, 3, 6, 7]
        assert torch.equal(moved[first], t[first]) and not torch.equal(moved[second], t[second])
        assert torch.equal(undo(moved), t)
        # a map that commutes with whole-cell moves (the cell means) is brought back on its own 4x4x4 grid
        assert torch.allclose(undo(F.avg_pool3d(moved, 4)), F.avg_pool3d(t, 4), atol=1e-6)
    with pytest.raises(ConfigError, match="multiple of the model's downsampling"):
        Fomo25Loss.second_view(8, 2, (16, 16, 18), 4, False, True, "cpu")
    with pytest.raises(ConfigError, match="downsampling"):
        Fomo25Loss.second_view(8, 2, (16, 16, 16), None, False, True, "cpu")


def test_pair_views_leave_only_a_code_of_the_image_agreeing():
    # a code of places agrees across a pair for free; the mirror breaks it unless the code is itself mirror-symmetric;
    # the shift breaks both. A code that follows the image agrees under every view (the two scans are the same image)
    i = torch.arange(4)
    cells = ((i.view(4, 1, 1) + 2 * i.view(1, 1, 4) + (i.view(1, 4, 1) > 1)) % 8).float()  # a class per 4³ cell
    x = F.interpolate(cells[None, None], scale_factor=4).expand(2, 1, 16, 16, 16)
    batch = {"x_a": x, "x_b": x.clone(), "pair_valid": torch.tensor([True, True])}
    cfg = dict(align="classes", w_align=1.0, w_swap=0, w_repel=0, w_kl=0, mask_ratio=0.01, block=8, variational=False)

    def align(code, seed, **view):
        torch.manual_seed(seed)
        return float(Fomo25Loss(Fomo25Config(**view, **cfg))(_FixedCode(code), batch)[1]["align"])

    for code in ("place", "mirrored place", "image"):
        assert all(align(code, s) < 1e-2 for s in range(4))
    assert all(align("image", s, pair_flip=True, pair_shift=True) < 1e-2 for s in range(8))
    assert all(align("mirrored place", s, pair_flip=True) < 1e-2 for s in range(8))
    place = [align("place", s, pair_flip=True) for s in range(8)]
    # a draw that mirrors nothing leaves it agreeing; every other draw breaks it
    assert all(v < 1e-2 or v > 1.0 for v in place) and sum(v > 1.0 for v in place) >= 4
    # a fixed code of places can be unmoved by one particular draw (the parity code by a mirror and a one-cell
    # shift along the same axis), but no code of places other than a constant one is unmoved by every draw
    for code in ("place", "mirrored place"):
        for view in ({"pair_shift": True}, {"pair_flip": True, "pair_shift": True}):
            values = [align(code, s, **view) for s in range(8)]
            assert all(v < 1e-2 or v > 1.0 for v in values) and sum(v > 1.0 for v in values) >= 6, (code, values)


@pytest.mark.parametrize("form", ["cosine", "centred", "mse"])
def test_the_shift_keeps_a_code_of_places_from_meeting_the_older_agreement_forms(form):
    # the other forms compare the two anatomy maps position by position too, so a code of places meets the
    # uncentred ones for free when the crops sit at one place; shifted, it does not, while a code of the image
    # still does. Centring on the running mean already refuses a code that is the same in every crop.
    i = torch.arange(4)
    cells = ((i.view(4, 1, 1) + 2 * i.view(1, 1, 4) + (i.view(1, 4, 1) > 1)) % 8).float()
    x = F.interpolate(torch.stack([cells, (3 * cells + 1) % 8])[:, None], scale_factor=4)  # two images
    batch = {"x_a": x, "x_b": x.clone(), "pair_valid": torch.tensor([True, True])}
    cfg = dict(align=form, w_align=1.0, w_swap=0, w_repel=0, w_kl=0, mask_ratio=0.01, block=8, variational=False)

    def align(code, seed, shift):
        torch.manual_seed(seed)
        return float(Fomo25Loss(Fomo25Config(pair_shift=shift, **cfg))(_FixedCode(code), batch)[1]["align"])

    assert all(align("image", s, shift) < 1e-3 for s in range(6) for shift in (False, True))
    unmoved = [align("place", s, False) for s in range(4)]
    assert all(v > 0.5 for v in unmoved) if form == "centred" else all(v < 1e-3 for v in unmoved), unmoved
    moved = [align("place", s, True) for s in range(8)]
    assert sum(v > 0.5 for v in moved) >= 6, moved
