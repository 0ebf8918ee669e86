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
    cfg["prediction_type"] = "x_prediction"      # epsilon, v_prediction and sample are honoured
    p.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="x_prediction"):
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
    with pytest.raises(CheckpointError, match="refused: it holds pickled objects"):
        load_unet(tmp_path)


class _RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint does."""

    def __reduce__(self):
        import os
        return (os.system, (f"touch {_RunsCode.marker}",))


@pytest.mark.parametrize("name", ["model.ckpt", "unet/diffusion_pytorch_model.bin"])
def test_code_in_a_pickle_is_never_run(tmp_path, folder, name):
    import pickle

    _RunsCode.marker = tmp_path / "pwned"
    target = (folder / name) if "/" in name else (tmp_path / name)
    if "/" in name:
        (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    target.write_bytes(pickle.dumps({"conv_in.weight": _RunsCode()}))
    # plain pickle.load would run it; ours refuses with a message that says why
    with pytest.raises(CheckpointError, match="refused.*could run code"):
        load_unet(folder if "/" in name else target)
    assert not _RunsCode.marker.exists()


def test_git_lfs_pointer_is_named(folder):
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 1234\n")
    with pytest.raises(CheckpointError, match="git-lfs pointer"):
        load_unet(folder)


def test_integer_weight_is_refused(folder):
    _edit_weights(folder, lambda sd: sd.__setitem__("conv_in.bias",
                                                    torch.zeros_like(sd["conv_in.bias"], dtype=torch.int32)))
    with pytest.raises(CheckpointError, match="conv_in.bias has dtype torch.int32"):
        load_unet(folder)


def test_truncated_safetensors(folder):
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt safetensors"):
        load_unet(folder)


def test_other_architecture_is_named(tmp_path, folder):
    from ddpm_fast.training import DIGITS_CONFIG

    torch.manual_seed(0)      # another layout than the tiny U-Net: 1 channel, attention at one level
    save_pretrained(UNet2DModel(DIGITS_CONFIG), tmp_path / "other")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(
        (tmp_path / "other" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="unexpected weights|has shape|missing weights"):
        load_unet(folder)


# ------------------------------------------------------------ original DDPM checkpoints

def _original_model(**kw):
    from original_ddpm import Model

    torch.manual_seed(0)
    model = Model(**kw).eval()
    with torch.no_grad():
        for p in model.parameters():       # non-trivial norms and biases too
            p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("kw,wrap", [
    (dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_levels=(1,)), "plain"),
    (dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_levels=(0, 1), in_ch=1), "ddim_list"),
    (dict(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, attn_levels=(2,)), "ddp_module"),
])
def test_original_checkpoint_converts_exactly(tmp_path, kw, wrap):
    model = _original_model(**kw)
    sd = model.state_dict()
    obj = {"plain": sd, "ddim_list": [sd, {"step": 1}],
           "ddp_module": {f"module.{k}": v for k, v in sd.items()}}[wrap]
    torch.save(obj, tmp_path / "model.ckpt")
    ours = load_unet(tmp_path / "model.ckpt", sample_size=16)
    x = torch.randn(2, kw.get("in_ch", 3), 16, 16)
    t = torch.tensor([0, 999])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t), model(x, t), rtol=1e-5, atol=1e-6)
    assert load_scheduler_config(tmp_path / "model.ckpt")["variance_type"] == "fixed_large"


def test_original_cifar10_layout_guesses_32px():
    from ddpm_fast.checkpoints import original_to_diffusers
    from original_ddpm import Model

    # the conversion reads names and shapes only: meta tensors, no 35.7 M weights drawn
    with torch.device("meta"):
        sd = Model(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_levels=(1,)).state_dict()
    config, converted = original_to_diffusers(sd, "cifar10.ckpt")
    assert config["sample_size"] == 32
    assert config["block_out_channels"] == [128, 256, 256, 256]
    assert config["down_block_types"] == ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D",
                                          "DownBlock2D"]
    with torch.device("meta"):
        ours = UNet2DModel(config)
    assert set(ours.state_dict()) == set(converted)
    assert all(ours.state_dict()[k].shape == v.shape for k, v in converted.items())
    assert sum(v.numel() for v in converted.values()) == 35_746_307     # the paper's 35.7 M


def test_not_an_original_checkpoint(tmp_path):
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an original DDPM checkpoint"):
        load_unet(tmp_path / "other.pt")


def test_training_run_folder_loads_ema(tmp_path):
    from ddpm_fast.training import DIGITS_CONFIG, TrainConfig, digits_dataset, train

    torch.manual_seed(0)
    cfg = TrainConfig(steps=2, batch_size=4, log_every=0, checkpoint_every=2)
    ema, _ = train(UNet2DModel(DIGITS_CONFIG), digits_dataset(8)[:16], cfg,
                   out_dir=tmp_path / "run" / "checkpoint", log=lambda *_: None)
    loaded = load_unet(tmp_path / "run")
    for (k, a), b in zip(ema.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


def _ddim_repo_checkpoint(path, with_ema: bool):
    """A training checkpoint as ermongroup/ddim's runners save it: the DataParallel model's
    state dict ("module." names), the optimizer's, epoch, step, and with EMA on the EMA
    helper's shadow (parameters only, names without "module.")."""
    kw = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_levels=(1,))
    raw = _original_model(**kw)
    ema = _original_model(**kw)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.01)
    opt = torch.optim.Adam(raw.parameters(), lr=1e-4)
    raw(torch.randn(1, 3, 16, 16), torch.tensor([3])).square().mean().backward()
    opt.step()                                   # an optimizer state with tensors in it
    states = [{f"module.{k}": v for k, v in raw.state_dict().items()}, opt.state_dict(), 7, 1234]
    if with_ema:
        states.append({n: p.detach().clone() for n, p in ema.named_parameters()})
    torch.save(states, path)
    return raw, ema


def _same_outputs(ours, model):
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0, 999])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t), model(x, t), rtol=1e-5, atol=1e-6)


def test_ddim_repo_checkpoint_takes_ema_unless_raw(tmp_path):
    raw, ema = _ddim_repo_checkpoint(tmp_path / "ckpt.pth", with_ema=True)
    ours = load_unet(tmp_path / "ckpt.pth", sample_size=16)            # the default: EMA
    _same_outputs(ours, ema)
    assert "EMA weights" in ours.loaded_weights and "5-element" in ours.loaded_weights
    ours = load_unet(tmp_path / "ckpt.pth", sample_size=16, weights="raw")
    _same_outputs(ours, raw)
    assert ours.loaded_weights.endswith("were not taken)") and "raw weights" in ours.loaded_weights
    with pytest.raises(ValueError, match="weights must be one of ema, raw"):
        load_unet(tmp_path / "ckpt.pth", weights="shadow")


def test_ddim_repo_checkpoint_without_ema_takes_the_model(tmp_path):
    raw, _ = _ddim_repo_checkpoint(tmp_path / "ckpt.pth", with_ema=False)
    ours = load_unet(tmp_path / "ckpt.pth", sample_size=16)
    _same_outputs(ours, raw)
    assert "no EMA weights" in ours.loaded_weights


def test_raw_weights_of_an_ema_only_dict_are_refused(tmp_path):
    ema = _original_model(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_levels=(1,))
    torch.save({"ema": ema.state_dict(), "step": 3}, tmp_path / "ckpt.pth")
    _same_outputs(load_unet(tmp_path / "ckpt.pth", sample_size=16), ema)
    with pytest.raises(CheckpointError, match="weights='raw'.*only EMA weights"):
        load_unet(tmp_path / "ckpt.pth", sample_size=16, weights="raw")


def test_training_run_raw_weights(tmp_path):
    from ddpm_fast.training import DIGITS_CONFIG, TrainConfig, digits_dataset, train

    torch.manual_seed(0)
    cfg = TrainConfig(steps=2, batch_size=4, log_every=0, checkpoint_every=2, ema_decay=0.5)
    train(UNet2DModel(DIGITS_CONFIG), digits_dataset(8)[:16], cfg,
          out_dir=tmp_path / "run" / "checkpoint", log=lambda *_: None)
    ema, raw = load_unet(tmp_path / "run"), load_unet(tmp_path / "run", weights="raw")
    assert "ema.safetensors" in ema.loaded_weights and "model.safetensors" in raw.loaded_weights
    assert not torch.equal(ema.conv_in.weight, raw.conv_in.weight)
