from __future__ import annotations

import pytest
import torch

from neurofm.errors import ConfigError
from neurofm.models.dual_latent import DualLatentUNet
from neurofm.models.registry import count_parameters, create_model, list_models

TINY = {
    "dual_latent_unet": ({"features": [4, 8, 16], "latent": 8}, (2, 1, 16, 16, 16)),
    "resenc_unet": (
        {"features": [4, 8, 16], "blocks": [1, 1, 1], "anatomy_outputs": 5, "dense_classes": 3, "health_classes": 2},
        (2, 1, 16, 16, 16),
    ),
    "vit_autoenc": ({"size": "tiny", "img_size": 16, "patch_size": 4}, (2, 4, 16, 16, 16)),
    "primus": ({"size": "tiny", "img_size": 16, "patch_size": 8}, (2, 1, 16, 16, 16)),
}


def test_every_registered_backbone_has_a_tiny_case():
    # "downstream" wraps these backbones with task heads; tests/tasks exercise it
    assert set(list_models()) - {"downstream"} == set(TINY)


@pytest.mark.parametrize("name", sorted(TINY))
def test_forward_backward_reaches_every_parameter(name):
    kwargs, shape = TINY[name]
    torch.manual_seed(0)
    model = create_model(name, **kwargs)
    x = torch.randn(shape)
    feats = model.forward_features(x)
    out = model(x)
    assert out.shape[0] == shape[0] and out.shape[2:] == shape[2:]
    loss = out.pow(2).mean()
    if name == "resenc_unet":
        pre = model.forward_pretext(x)
        loss = loss + pre["anatomy"].sum() + pre["health"].sum()
        loss = loss + pre["dense"].sum()
    if name == "dual_latent_unet":
        loss = loss + feats.latents["logvar_s"].sum() + feats.latents["logvar_c"].sum()
    loss.backward()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        assert p.grad is not None, f"{n} got no gradient"
        assert torch.isfinite(p.grad).all(), n
    assert all(k in model.state_dict() for k in model.stem_keys)
    tm = model.transfer_map()
    assert tm["in_channels"] == shape[1]
    assert all(any(k.startswith(p) for k in model.state_dict()) for p in tm["encoder_prefixes"])


def test_paper_sizes():
    assert 18e6 < count_parameters(DualLatentUNet()) < 20e6  # the paper: "20 M"
    resenc = create_model("resenc_unet")
    assert 100e6 < count_parameters(resenc) < 104e6  # nnU-Net ResEnc-L
    keys = list(resenc.state_dict())
    assert keys[0].startswith("encoder.stem.") and any(k.startswith("decoder.seg_layers") for k in keys)


def test_dual_latent_shapes():
    m = DualLatentUNet(features=(4, 8, 16, 32), latent=6)
    f = m.forward_features(torch.randn(1, 1, 32, 32, 32))
    assert f.latents["mu_s"].shape == (1, 6, 4, 4, 4) and f.latents["mu_c"].shape == (1, 6, 4, 4, 4)
    assert m.decode(f.latents["mu_s"], f.latents["mu_c"]).shape == (1, 1, 32, 32, 32)
    with pytest.raises(ValueError, match="divisible by 8"):
        m.forward_features(torch.randn(1, 1, 20, 32, 32))


def test_bad_model_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="unknown model"):
        create_model("unet9000")
    with pytest.raises(ConfigError, match="bad arguments"):
        create_model("dual_latent_unet", filters=3)
    with pytest.raises(ConfigError, match="square"):
        create_model("vit_autoenc", img_size=32, patch_size=8)


def test_film_decoder_renders_the_anatomy_with_the_contrast_codes_scale_and_shift():
    torch.manual_seed(0)
    m = DualLatentUNet(features=(4, 8, 16), latent=6, contrast_code="global", contrast_injection="film").eval()
    assert m.config["contrast_injection"] == "film" and "contrast_injection" not in DualLatentUNet().config
    with torch.no_grad():
        lat = m.forward_features(torch.randn(2, 1, 16, 16, 16)).latents
        zs, zc = lat["mu_s"], lat["mu_c"]
        assert zc.shape == (2, 6, 1, 1, 1) and m.decode(zs, zc).shape == (2, 1, 16, 16, 16)
        other = torch.randn_like(zc)
        assert not torch.allclose(m.decode(zs, zc), m.decode(zs, other))  # the code reaches the output
        films = [b.film for b in m.decoder["blocks"]]
        for f in films:  # scale 1, shift 0 whatever the code: the code has no say
            f.weight.zero_()
            f.bias.zero_()
        assert torch.equal(m.decode(zs, zc), m.decode(zs, other))
        assert not torch.allclose(m.decode(zs, zc), m.decode(torch.randn_like(zs), zc))  # the anatomy does
        for f in films:  # scale 0 and a shift: every stage's output is set by the code alone, the anatomy is gone
            n = f.bias.numel() // 2
            f.bias[:n] = -1.0
            f.bias[n:] = 0.5
        flat = m.decode(zs, zc)
        assert torch.allclose(flat, flat.flatten(1)[:, :1, None, None, None].expand_as(flat), atol=1e-5)
        assert torch.allclose(flat, m.decode(torch.randn_like(zs), zc), atol=1e-5)
    with pytest.raises(ConfigError, match="needs contrast_code=global"):
        DualLatentUNet(contrast_injection="film")
    with pytest.raises(ConfigError, match="contrast_injection"):
        DualLatentUNet(contrast_code="global", contrast_injection="adain")


def test_every_backbone_says_its_downstream_trunk_with_or_without_the_kept_pretext_head():
    """DownstreamModel asks downstream_kwargs(kwargs, n_contrasts, pretext_features=True) of a trunk that keeps a
    pretext head: every built-in backbone takes the flag, and without it keeps the two-argument call."""
    import inspect

    from neurofm.models.registry import list_models, model_class

    for name in list_models():
        cls = model_class(name)
        if not hasattr(cls, "downstream_kwargs"):
            continue
        params = inspect.signature(cls.downstream_kwargs).parameters
        assert "pretext_features" in params and params["pretext_features"].default is False, name
        assert isinstance(cls.downstream_kwargs({}, 2), dict), name
