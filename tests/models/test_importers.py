from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.primus import Primus
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from monai.networks.nets import ViTAutoEnc
from torch import nn

from field_checkpoints import PRIMUS_KEYS, RESENC_KEYS, nnssl_checkpoint, nnunet_checkpoint, resenc_arch_kwargs
from neurofm.errors import CheckpointError
from neurofm.io.checkpoint import safe_load
from neurofm.models.importers import import_weights
from neurofm.models.registry import model_from_checkpoint


def _dna_resenc():
    torch.manual_seed(0)
    return ResidualEncoderUNet(
        1,
        4,
        (8, 16, 32, 32),
        nn.Conv3d,
        3,
        (1, 2, 2, 2),
        (1, 2, 2, 1),
        1,
        (1, 1, 1),
        True,
        nn.InstanceNorm3d,
        {"eps": 1e-5, "affine": True},
        None,
        None,
        nn.LeakyReLU,
        {"inplace": True},
    )


def _dna_primus():
    torch.manual_seed(0)
    return Primus(1, 48, (8, 8, 8), 1, eva_depth=3, eva_numheads=2, input_shape=(32, 32, 32))  # no nnssl size


def _same_outputs(ours: nn.Module, theirs: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((ours.eval()(x) - theirs.eval()(x)).abs().max())


def _resenc_file(tmp_path, layout: str):
    net = _dna_resenc()
    if layout == "nnunet":
        ck = nnunet_checkpoint(
            net,
            [8, 16, 32, 32],
            [1, 2, 2, 1],
            spacing=[1.5, 1.5, 1.5],
            patch=[64, 96, 64],
            channels={"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"},
            labels={"background": 0, "tumour": [1, 2, 3]},
        )
    else:
        ck = nnssl_checkpoint(
            net,
            "ResidualEncoderUNet",
            resenc_arch_kwargs([8, 16, 32, 32], [1, 2, 2, 1]),
            patch=[64, 64, 64],
            spacing=[1.0, 1.0, 1.0],
            **RESENC_KEYS,
        )
    prefix = {"ddp": "module.", "compiled": "_orig_mod.", "ddp-compiled": "module._orig_mod."}.get(layout, "")
    ck["network_weights"] = {prefix + k: v for k, v in ck["network_weights"].items()}
    src = tmp_path / "checkpoint_final.pth"
    torch.save(ck, src)
    return net, src


@pytest.mark.parametrize("layout", ["nnssl", "nnunet", "ddp", "compiled", "ddp-compiled"])
def test_resenc_import_as_trainers_write_it(tmp_path, layout):
    net, src = _resenc_file(tmp_path, layout)
    run = import_weights("nnunet" if layout == "nnunet" else "nnssl", src, tmp_path / "run")
    model, info = model_from_checkpoint(run)
    assert info["model"]["kwargs"]["features"] == [8, 16, 32, 32]
    assert info["model"]["kwargs"]["blocks"] == [1, 2, 2, 1]
    ours = model.state_dict()
    for k, v in net.state_dict().items():
        assert torch.equal(ours[k], v), k
    assert _same_outputs(model, net, torch.randn(1, 1, 16, 16, 16)) <= 1e-5
    source = info["run"]["extra"]["source"]
    if layout == "nnunet":  # the plans' spacing and patch, the dataset's channels and labels, mirroring
        assert info["preprocessing"]["spacing"] == 1.5 and info["run"]["data"]["patch"] == 64
        assert source["tool"] == "nnunet" and source["architecture"] == "ResidualEncoderUNet"
        assert source["channel_names"]["3"] == "FLAIR" and source["labels"]["tumour"] == [1, 2, 3]
        assert source["mirroring_axes"] == [0, 1, 2] and source["patch"] == [64, 96, 64]
    else:  # the adaptation plan: spacing, patch, which keys are stem / encoder / input projection
        assert info["preprocessing"]["spacing"] == 1.0 and info["preprocessing"]["normalize"] == "zscore"
        assert info["run"]["data"]["patch"] == 160  # recommended_downstream_patchsize
        assert source["tool"] == "nnssl" and source["patch"] == [64, 64, 64] and source["epoch"] == 1000
        assert info["transfer"]["source_keys"]["key_to_encoder"] == "encoder.stages"
        assert info["transfer"]["source_keys"]["keys_to_in_proj"][0] == "encoder.stem.convs.0.conv"
    json.dumps(info["run"])  # everything recorded is plain JSON (no numpy left)


def test_primus_import_as_nnssl_writes_it(tmp_path):
    net = _dna_primus()
    ck = nnssl_checkpoint(
        net,
        "Primus",
        None,
        patch=[32, 32, 32],
        spacing=[1.0, 1.0, 1.0],
        **PRIMUS_KEYS,
        trainer="BaseEvaMAETrainer",
    )
    torch.save(ck, tmp_path / "primus.pth")
    run = import_weights("nnssl", tmp_path / "primus.pth", tmp_path / "run", num_heads=2)
    model, info = model_from_checkpoint(run)
    kw = info["model"]["kwargs"]
    assert info["model"]["name"] == "primus" and (kw["img_size"], kw["patch_size"]) == (32, 8)
    assert (kw["embed_dim"], kw["eva_depth"], kw["eva_numheads"]) == (48, 3, 2)
    assert info["run"]["data"]["patch"] == 32  # a transformer takes the cube it was built for
    assert _same_outputs(model, net, torch.randn(2, 1, 32, 32, 32)) <= 1e-5
    with pytest.raises(CheckpointError, match="--num-heads"):  # not an nnssl size: the heads cannot be read
        import_weights("nnssl", tmp_path / "primus.pth", tmp_path / "run2")


def test_primus_m_import_reads_heads_from_the_plan(tmp_path):
    from dynamic_network_architectures.architectures.primus import PrimusM

    torch.manual_seed(0)
    net = PrimusM(1, 1, (8, 8, 8), (16, 16, 16))  # Primus-M at a small input: 864 wide, 16 blocks, 12 heads
    ck = nnssl_checkpoint(
        net,
        "PrimusM",
        None,
        patch=[16, 16, 16],
        spacing=[1.0, 1.0, 1.0],
        **PRIMUS_KEYS,
    )
    torch.save(ck, tmp_path / "primus_m.pth")
    model, info = model_from_checkpoint(import_weights("nnssl", tmp_path / "primus_m.pth", tmp_path / "run"))
    assert info["model"]["kwargs"]["size"] == "M" and "eva_numheads" not in info["model"]["kwargs"]
    assert _same_outputs(model, net, torch.randn(1, 1, 16, 16, 16)) <= 1e-5


def test_numpy_values_load_and_code_does_not(tmp_path):
    values = {
        "f64": np.float64(0.5),
        "f32": np.float32(2.0),
        "i64": np.int64(3),
        "flag": np.bool_(True),
        "dtype": np.dtype("float32"),
        "array": np.arange(6, dtype=np.int16).reshape(2, 3),
        "strings": np.array(["T1", "FLAIR"]),
        "device": torch.device("cuda", 0),
        "axes": (0, 1, 2),
    }
    torch.save(values, tmp_path / "v.pth")
    got = safe_load(tmp_path / "v.pth")
    assert got["f64"] == 0.5 and got["array"].tolist() == [[0, 1, 2], [3, 4, 5]] and got["dtype"] == np.float32
    assert got["device"] == torch.device("cuda", 0) and list(got["strings"]) == ["T1", "FLAIR"]
    # numpy 1.x wrote its scalars as numpy.core.multiarray.scalar (most checkpoints in the wild)
    legacy = tmp_path / "legacy.pth"
    torch.save({"loss": np.float64(0.25)}, legacy, _use_new_zipfile_serialization=False, pickle_protocol=2)
    raw = legacy.read_bytes()
    assert b"numpy._core.multiarray" in raw
    legacy.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert safe_load(legacy)["loss"] == 0.25
    # numpy's namespace is not opened wholesale: a pickle that calls a numpy function is refused
    evil = tmp_path / "np_evil.pth"
    with open(evil, "wb") as fh:
        pickle.dump({"x": NumpyCall(str(tmp_path / "written.npy"))}, fh)
    with pytest.raises(CheckpointError, match="numpy.*save"):
        safe_load(evil)
    assert not (tmp_path / "written.npy").exists()


class NumpyCall:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (np.save, (self.path, np.zeros(1)))


def _from_plan(plan: dict) -> nn.Module:
    """Build the network an nnssl adaptation plan describes, as nnssl's get_network_from_plans does."""
    import pydoc

    arch = plan["architecture_plans"]
    if arch["arch_class_name"] == "ResidualEncoderUNet":
        kw = dict(arch["arch_kwargs"])
        for key in arch["arch_kwargs_requiring_import"]:
            if kw[key] is not None:
                kw[key] = pydoc.locate(kw[key])
        return ResidualEncoderUNet(input_channels=plan["pretrain_num_input_channels"], num_classes=1, **kw)
    kw = arch["arch_kwargs"]
    return Primus(plan["pretrain_num_input_channels"], num_classes=1, **kw)


@pytest.mark.parametrize("backbone", ["resenc", "primus"])
def test_export_nnssl_round_trip(tmp_path, backbone, run_cli):
    from neurofm.io.checkpoint import write_run_folder
    from neurofm.models.registry import create_model

    torch.manual_seed(1)
    if backbone == "resenc":  # with ssl3d heads, which stay behind
        kwargs = {"features": [8, 16, 32, 32], "blocks": [1, 2, 2, 1], "anatomy_outputs": 5, "health_classes": 2}
        name, x = "resenc_unet", torch.randn(1, 1, 16, 16, 16)
    else:
        kwargs = {"size": "tiny", "img_size": 32}
        name, x = "primus", torch.randn(1, 1, 32, 32, 32)
    model = create_model(name, **kwargs)
    cfg = {"preset": "test", "model": {"name": name, "kwargs": kwargs}, "data": {"patch": 32}}
    cfg["extra"] = {"preprocessing": {"spacing": 2.0, "normalize": "zscore", "orientation": "RAS"}}
    write_run_folder(tmp_path / "run", model, cfg, {"step": 7, "epoch": 3})
    code, _, err = run_cli("export", tmp_path / "run", "--format", "nnssl", "--out", tmp_path / "out")
    assert code == 0, err
    out = tmp_path / "out" / "checkpoint_final.pth"
    ck = torch.load(out, weights_only=True)  # what nnssl and nnU-Net call: no safe-globals needed
    plan = ck["nnssl_adaptation_plan"]
    conf = next(iter(plan["pretrain_plan"]["configurations"].values()))
    assert conf["spacing"] == [2.0, 2.0, 2.0] and conf["normalization_schemes"] == ["ZScoreNormalization"]
    theirs = _from_plan(plan)  # nnssl's side: the network from the plan, the weights by its keys
    theirs.load_state_dict(ck["network_weights"], strict=True)
    # what nnU-Net's pretrained fine-tuning takes over: the stem, the encoder, the input projection
    taken = [k for k in ck["network_weights"] if k.startswith((plan["key_to_stem"], plan["key_to_encoder"]))]
    assert len(taken) > 10 and all(f"{k}.weight" in ck["network_weights"] for k in plan["keys_to_in_proj"])
    assert _same_outputs(model, theirs, x) <= 1e-6
    code, _, err = run_cli("import", "nnssl", out, "--out", tmp_path / "back")
    assert code == 0, err
    back, info = model_from_checkpoint(tmp_path / "back")
    assert _same_outputs(back, model, x) <= 1e-6 and info["preprocessing"]["spacing"] == 2.0


def test_monai_vit_import_round_trip(tmp_path):
    torch.manual_seed(0)
    vit = ViTAutoEnc(
        in_channels=4,
        out_channels=4,
        img_size=32,
        patch_size=16,
        hidden_size=128,
        mlp_dim=256,
        num_layers=2,
        num_heads=2,
        proj_type="conv",
    )
    src = tmp_path / "lamim.pt"
    torch.save(vit.state_dict(), src)
    run = import_weights("monai", src, tmp_path / "run", num_heads=2)
    model, info = model_from_checkpoint(run)
    kw = info["model"]["kwargs"]
    assert (kw["hidden_size"], kw["num_layers"], kw["mlp_dim"], kw["img_size"], kw["patch_size"]) == (
        128,
        2,
        256,
        32,
        16,
    )
    x = torch.rand(1, 4, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), vit.eval()(x)[0], atol=1e-5)
    assert info["preprocessing"]["contrasts"] == ["T1w", "T1c", "T2w", "FLAIR"]


class Payload:
    """A pickle that would run a shell command when loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickles_with_executable_payloads_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pth"
    with open(bad, "wb") as fh:
        pickle.dump({"network_weights": {}, "x": Payload(marker)}, fh)
    with pytest.raises(CheckpointError, match="executable pickle content"):
        safe_load(bad)
    with pytest.raises(CheckpointError, match="refused"):
        import_weights("nnssl", bad, tmp_path / "run")
    assert not marker.exists()


def test_import_errors_are_clear(tmp_path):
    torch.save({"network_weights": {"foo.weight": torch.zeros(2)}}, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="not a ResEnc"):
        import_weights("nnssl", tmp_path / "x.pth", tmp_path / "r")
    with pytest.raises(CheckpointError, match="no such file"):
        import_weights("nnssl", tmp_path / "missing.pth", tmp_path / "r")
    (tmp_path / "junk.pth").write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        import_weights("monai", tmp_path / "junk.pth", tmp_path / "r")
