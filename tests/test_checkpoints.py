"""Model folders: diffusers' own save_pretrained output loads without diffusers; every broken
folder gives a one-line CheckpointError naming the file and the problem."""
import json

import pytest
import torch

from ddpm_fast.checkpoints import CheckpointError, load_scheduler_config, load_unet, save_pretrained
from ddpm_fast.unet import UNet2DModel


@pytest.fixture
def folder(tmp_path):
    torch.manual_seed(0)
    save_pretrained(UNet2DModel("tiny"), tmp_path)
    return tmp_path


def _edit_weights(folder, fn):
    from safetensors.torch import load_file, save_file
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(path))
    fn(sd)
    save_file(sd, str(path))


def test_roundtrip(folder):
    unet = load_unet(folder)
    assert unet.config.block_out_channels == (32, 64, 64)
    assert load_scheduler_config(folder)["beta_schedule"] == "linear"


def test_loads_diffusers_save_pretrained(tmp_path, tiny_diffusers_unet):
    tiny_diffusers_unet.save_pretrained(tmp_path)          # bare model folder
    ours = load_unet(tmp_path)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(ours(x, torch.tensor(5)), tiny_diffusers_unet(x, 5).sample)


def test_missing_weight(folder):
    _edit_weights(folder, lambda sd: sd.pop("conv_in.weight"))
    with pytest.raises(CheckpointError, match="missing weights for conv_in.weight"):
        load_unet(folder)


def test_mismatched_weight(folder):
    _edit_weights(folder, lambda sd: sd.__setitem__("conv_out.bias", torch.zeros(5)))
    with pytest.raises(CheckpointError, match=r"conv_out.bias has shape \(5,\)"):
        load_unet(folder)


def test_unexpected_weight(folder):
    _edit_weights(folder, lambda sd: sd.__setitem__("extra.weight", torch.zeros(1)))
    with pytest.raises(CheckpointError, match="unexpected weights extra.weight"):
        load_unet(folder)


def test_non_finite_weight(folder):
    _edit_weights(folder, lambda sd: sd["conv_in.bias"].fill_(float("nan")))
    with pytest.raises(CheckpointError, match="non-finite"):
        load_unet(folder)


def test_corrupt_weights_file(folder):
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt safetensors"):
        load_unet(folder)


def test_unknown_block_type(folder):
    cfg_path = folder / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["down_block_types"][1] = "CrossAttnDownBlock2D"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unknown down block type 'CrossAttnDownBlock2D'"):
        load_unet(folder)


def test_missing_folder_and_files(tmp_path, folder):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_unet(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_unet(folder / "scheduler")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        load_unet(folder)


def test_bad_json(folder):
    (folder / "unet" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_unet(folder)


def test_unsupported_prediction_type(folder):
    p = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(p.read_text())
    cfg["prediction_type"] = "v_prediction"
    p.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="v_prediction"):
        load_scheduler_config(folder)


def test_bin_weights_load_safely(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DModel("tiny")
    save_pretrained(unet, tmp_path)
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(unet.state_dict(), tmp_path / "unet" / "diffusion_pytorch_model.bin")
    assert torch.equal(load_unet(tmp_path).conv_in.weight, unet.conv_in.weight)
    # a pickle with arbitrary objects is refused by weights_only loading
    torch.save({"conv_in.weight": object()}, tmp_path / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="cannot load weights safely"):
        load_unet(tmp_path)
