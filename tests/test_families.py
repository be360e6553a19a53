"""The family classes of models.py against stock diffusers: partial decodes of the causal 3D VAEs,
CogVideoX's stochastic DPM sampler, LoRA on ModelScope's UNet3D, and lora_alpha in the saved LoRA."""
import os

import pytest
import torch

import common
import models
import tiny_models
from test_common import PROMPTS, stock_video


@pytest.mark.parametrize("family,num_frames", [("cogvideox", 17), ("cogvideox", 9), ("wan", 9)])
def test_partial_decode_equals_the_full_decode(tmp_path, family, num_frames):
    tiny_models.build(family, str(tmp_path))
    model = models.load_model(str(tmp_path))
    lat = torch.randn((2, *model.latent_shape(num_frames, 16, 16)), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model.decode(lat)
        assert full.shape[1] == num_frames
        for frames in [[k] for k in range(num_frames)] + [[0, 5], [2, 3, 8], [1, num_frames - 1]]:
            part = model.decode(lat, frames=frames)
            assert torch.allclose(part, full[:, frames], atol=1e-5), (frames, (part - full[:, frames]).abs().max())


def test_wan_decoder_grad_own_keeps_the_values_and_truncates_the_gradient(tmp_path):
    """VADER's --decoder-grad own: the decoded frames equal the full decode's, the latent frames holding them get
    exactly the gradient the whole-prefix decode gives them, and the earlier latent frames get none."""
    tiny_models.build("wan", str(tmp_path))
    model = models.load_model(str(tmp_path))
    lat = torch.randn((2, *model.latent_shape(13, 16, 16)), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model.decode(lat)
    for frames, own in (([9], [3]), ([4, 9], [1, 3]), ([0], [0])):  # pixel 4k-3..4k -> latent k (latent 0: pixel 0)
        grads, videos = {}, {}
        for prefix_grad in (True, False):
            z = lat.clone().requires_grad_()
            videos[prefix_grad] = model.decode(z, frames, prefix_grad=prefix_grad)
            weights = torch.linspace(0, 1, videos[prefix_grad].numel()).view_as(videos[prefix_grad])
            (videos[prefix_grad] * weights).sum().backward()
            grads[prefix_grad] = z.grad
        assert torch.equal(videos[False], videos[True]) and torch.allclose(videos[False], full[:, frames], atol=1e-5)
        last = own[-1]  # the last decoded latent frame: no later frame reaches it through the cache, so equal
        assert torch.allclose(grads[False][:, :, last], grads[True][:, :, last], atol=1e-7)
        assert grads[False][:, :, last].abs().sum() > 0
        for i in range(last):
            if i not in own:  # the rest of the causal prefix: no gradient when truncated, some when not
                assert grads[False][:, :, i].abs().sum() == 0 and grads[True][:, :, i].abs().sum() > 0, i


def test_cogvideox_dpm_sampler_equals_stock_pipeline(tmp_path):
    import diffusers  # the stock pipeline draws the initial latents AND the step noise from the same generators
    tiny_models.build("cogvideox", str(tmp_path), scheduler=diffusers.CogVideoXDPMScheduler(
        prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=False, rescale_betas_zero_snr=True))
    model = models.load_model(str(tmp_path))
    _, ours = common.sample(model, PROMPTS, [11, 22], 9, 16, 16, steps=3, guidance=4.0)
    stock = stock_video("cogvideox", str(tmp_path), PROMPTS, [11, 22])
    assert (ours - stock).abs().max() < 1e-4


def stock_with_lora(family, folder, lora, monkeypatch):
    """The stock pipeline's output with `lora` loaded through its load_lora_weights. diffusers 0.42's
    UNet3DConditionModel lacks PeftAdapterMixin, so for ModelScope that loader fails on ANY LoRA
    ('no attribute load_lora_adapter'); the unet gets diffusers' own mixin and the stock loader runs unchanged."""
    import diffusers
    from diffusers.loaders.peft import PeftAdapterMixin
    if family == "modelscope":
        monkeypatch.setattr(diffusers, "UNet3DConditionModel",
                            type("UNet3DConditionModel", (diffusers.UNet3DConditionModel, PeftAdapterMixin), {}))
    return stock_video(family, folder, PROMPTS, [11, 22], lora=lora)


@pytest.mark.parametrize("family,alpha", [("modelscope", None), ("wan", 8), ("modelscope", 8)])
def test_lora_round_trip_with_the_stock_pipeline(tiny_folders, tmp_path, monkeypatch, family, alpha):
    model = models.load_model(tiny_folders[family])
    common.setup_trainable(model, lora_rank=4, lora_alpha=alpha)
    with torch.no_grad():
        for n, p in model.denoiser.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
    F, H, W = tiny_models.SIZES[family]
    _, ours = common.sample(model, PROMPTS, [11, 22], F, H, W, steps=3, guidance=4.0)
    model.save_lora(str(tmp_path / "lora"))
    base = stock_video(family, tiny_folders[family], PROMPTS, [11, 22])
    with_lora = stock_with_lora(family, tiny_folders[family], str(tmp_path / "lora"), monkeypatch)
    assert (with_lora - base).abs().max() > 1e-3  # the adapter changes the output ...
    assert (with_lora - ours).abs().max() < 1e-4  # ... exactly as it did in our model, alpha/rank scale included


def test_modelscope_trains_end_to_end(tmp_path, tiny_folders):
    import json
    import os

    import online_vpo
    from helpers import run_main
    from test_online_vpo import FAST
    out = str(tmp_path / "ms")
    run_main(online_vpo, FAST + ["--model", tiny_folders["modelscope"], "--reward", "toy:temporal", "--num-frames", "4",
                                 "--height", "16", "--width", "16", "--steps", "2", "--out", out, "--eval-every", "99"])
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows if not r.get("eval")] == [1, 2] and all(r["loss"] == r["loss"] for r in rows[1:-1])
    assert os.path.exists(os.path.join(common.latest_checkpoint(out), "lora", "pytorch_lora_weights.safetensors"))


def test_modelscope_refuses_grad_checkpointing_before_loading(tmp_path, tiny_folders):
    import online_vpo
    from helpers import run_main
    # diffusers' UNet3DConditionModel cannot checkpoint its blocks: a clear error before the weights load
    with pytest.raises(ValueError, match="does not support gradient checkpointing"):
        run_main(online_vpo, ["--model", tiny_folders["modelscope"], "--grad-checkpointing", "--out", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()


def test_wan22_ti2v_refuses_a_size_its_patches_cannot_tile(tmp_path):
    # 720 / 16 = 45 latent rows cannot be cut into 2x2 patches: the denoiser's output came back 44 rows high
    import argparse
    import json
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "expand_timesteps": True}))
    args = argparse.Namespace(num_frames=33, height=720, width=1280, guidance=5.0, guidance_2=None, fps=24)
    with pytest.raises(ValueError, match="multiples of 32"):
        models.fill_video_args(args, str(tmp_path), "wan")
    args.height = 704
    models.fill_video_args(args, str(tmp_path), "wan")  # Wan 2.2 5B's own 720p


def test_common_holds_no_family_code():
    """Family knowledge lives in models.py, one class per family directly under VideoModel; common.py branches
    on no family and imports no model library or models.py."""
    import re
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = "import sys, common; print(sorted(m for m in sys.modules if m in ('models', 'diffusers', 'transformers')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert not re.search(r"\.family\s*(==|!=|in\b)", open(os.path.join(root, "common.py")).read())
    for name, cls in models.FAMILIES.items():
        assert cls.family == name and cls.__mro__[1] is models.VideoModel
        for method in ("latent_shape", "call_denoiser", "decode"):  # the base has no default for these
            assert getattr(cls, method) is not getattr(models.VideoModel, method), (name, method)
