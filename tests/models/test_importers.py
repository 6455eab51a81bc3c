from __future__ import annotations

import os
import pickle

import pytest
import torch
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from monai.networks.nets import ViTAutoEnc
from torch import nn

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


@pytest.mark.parametrize("layout", ["nnssl", "nnunet", "compiled"])
def test_resenc_import_round_trip(tmp_path, layout):
    net = _dna_resenc()
    sd = net.state_dict()
    if layout == "compiled":  # a torch.compile'd network saves its keys under _orig_mod.
        sd = {f"_orig_mod.{k}": v for k, v in sd.items()}
    # the layouts of nnssl and nnU-Net checkpoint files: weights plus plain metadata
    payload = {
        "network_weights": sd,
        "init_args": {"plans": {"name": "x"}, "configuration": "3d_fullres"},
        "trainer_name": "BaseMAETrainer",
        "current_epoch": 999,
    }
    src = tmp_path / "checkpoint_final.pth"
    torch.save(payload, src)
    run = import_weights("nnssl" if layout != "nnunet" else "nnunet", src, tmp_path / "run")
    model, info = model_from_checkpoint(run)
    assert info["model"]["kwargs"]["features"] == [8, 16, 32, 32]
    assert info["model"]["kwargs"]["blocks"] == [1, 2, 2, 1]
    ours = model.state_dict()
    for k, v in net.state_dict().items():
        assert torch.equal(ours[k], v), k
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x), net.eval()(x), atol=1e-5)


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
