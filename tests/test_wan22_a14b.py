"""Wan 2.2 A14B: two experts (transformer for high noise, transformer_2 for low noise) switched at
boundary_ratio, each with its own guidance. Our sampler against the stock WanPipeline, the routing of
training timesteps, LoRA on both experts into the stock pipeline, and the four scripts end to end."""
import json
import math
import os

import pytest
import torch

import common
import models
import gran_dpo
import online_vpo
import tiny_models
import vader_grad
import vlm_feedback_rwr as rwr
from helpers import run_main

PROMPTS = ["a red square falling", "a blue circle moving left"]
F, H, W = tiny_models.SIZES["wan_a14b"]


def stock(folder, loras=(), steps=4, guidance=4.0, guidance_2=2.0, seeds=(11, 22)):
    import diffusers
    pipe = diffusers.WanPipeline.from_pretrained(folder)
    for lora, second in loras:
        pipe.load_lora_weights(lora, load_into_transformer_2=second)
    return torch.as_tensor(pipe(prompt=PROMPTS, negative_prompt=[""] * 2, num_frames=F, height=H, width=W,
                                num_inference_steps=steps, guidance_scale=guidance, guidance_scale_2=guidance_2,
                                output_type="pt", max_sequence_length=512,
                                generator=[torch.Generator().manual_seed(s) for s in seeds]).frames)


def calls_per_expert(model):
    calls = {0: 0, 1: 0}
    for i, den in enumerate(model.experts):
        den.register_forward_pre_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def test_loads_both_experts_and_samples_like_the_stock_pipeline(tiny_folders):
    model = models.load_model(tiny_folders["wan_a14b"])
    assert model.denoiser_2 is not None and model.boundary == pytest.approx(875.0)
    assert models.model_defaults(model.path, "wan")["guidance_2"] == 3.0
    calls = calls_per_expert(model)
    _, ours = common.sample(model, PROMPTS, [11, 22], F, H, W, steps=4, guidance=4.0, guidance_2=2.0)
    assert calls[0] > 0 and calls[1] > 0  # both experts ran (high-noise steps first)
    assert (ours - stock(tiny_folders["wan_a14b"])).abs().max() < 1e-4
    lat, _ = common.sample(model, PROMPTS, [11, 22], F, H, W, steps=4, guidance=4.0, guidance_2=2.0)
    lat_other, _ = common.sample(model, PROMPTS, [11, 22], F, H, W, steps=4, guidance=4.0, guidance_2=12.0)
    lat_high, _ = common.sample(model, PROMPTS, [11, 22], F, H, W, steps=4, guidance=12.0, guidance_2=2.0)
    diff_2, diff_high = (lat_other - lat).abs().max().item(), (lat_high - lat).abs().max().item()
    assert diff_2 > 1e-5 and diff_high > 1e-5, (diff_2, diff_high)  # each expert's steps use their own guidance


def test_a_training_batch_of_mixed_timesteps_goes_to_each_timesteps_expert(tiny_folders):
    model = models.load_model(tiny_folders["wan_a14b"])
    x = torch.randn(3, 16, 3, 2, 2)
    t = torch.tensor([950.0, 300.0, 875.0])  # high, low, high (t >= boundary is high noise)
    emb, mask = model.encode_prompts(PROMPTS[:1] * 3)
    mixed = model.denoise(x, t, emb, mask)
    with torch.no_grad():
        for i, den in ((0, model.denoiser), (1, model.denoiser_2), (2, model.denoiser)):
            alone = model.call_denoiser(den, x[i:i + 1], t[i:i + 1], emb[i:i + 1])
            assert torch.allclose(mixed[i:i + 1], alone, atol=1e-6)
    assert not torch.allclose(mixed[1:2], model.call_denoiser(model.denoiser, x[1:2], t[1:2], emb[1:2]), atol=1e-4)


def test_lora_on_both_experts_loads_in_the_stock_pipeline(tiny_folders, tmp_path):
    model = models.load_model(tiny_folders["wan_a14b"])
    params = common.setup_trainable(model, lora_rank=4, lora_alpha=8)
    assert any(p is q for p in params for q in model.denoiser_2.parameters())  # the low-noise expert trains too
    with torch.no_grad():
        for i, den in enumerate(model.experts):
            for n, p in den.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.3, generator=torch.Generator().manual_seed(3 + i))
    _, ours = common.sample(model, PROMPTS, [11, 22], F, H, W, steps=4, guidance=4.0, guidance_2=2.0)
    model.save_lora(str(tmp_path / "lora"))
    for folder in ("lora", "lora_transformer_2"):
        assert os.path.exists(tmp_path / folder / "pytorch_lora_weights.safetensors")
    base = stock(tiny_folders["wan_a14b"])
    theirs = stock(tiny_folders["wan_a14b"], [(str(tmp_path / "lora"), False), (str(tmp_path / "lora_transformer_2"), True)])
    assert (theirs - base).abs().max() > 1e-3 and (theirs - ours).abs().max() < 1e-4


def test_vader_last_steps_reach_the_low_noise_expert_only(tiny_folders):
    model = models.load_model(tiny_folders["wan_a14b"])
    params = common.setup_trainable(model, lora_rank=4)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    _, video = common.sample(model, PROMPTS, [1, 2], F, H, W, steps=4, guidance=3.0, grad_from=3)  # K = 1
    video.mean().backward()
    grads = {i: sum(p.grad.abs().sum().item() for p in den.parameters() if p.requires_grad and p.grad is not None)
             for i, den in enumerate(model.experts)}
    assert grads[0] == 0 and grads[1] > 0


def test_early_size_check_and_alias(tiny_folders, tmp_path):
    assert models.MODEL_ALIASES["wan2.2-a14b"] == "Wan-AI/Wan2.2-T2V-A14B-Diffusers"
    with pytest.raises(ValueError, match="must be 4k\\+1"):
        run_main(online_vpo, ["--model", tiny_folders["wan_a14b"], "--num-frames", "8", "--out", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="pass a coarser grid"):  # 16x16 pixels are a 2x2 latent: 4x4 patches cannot tile it
        run_main(gran_dpo, ["--model", tiny_folders["wan_a14b"], "--num-frames", "9", "--height", "16", "--width", "16",
                            "--patch-grid", "2,4,4", "--reward", "toy:quality", "--out", str(tmp_path / "g")])
    assert not os.path.exists(tmp_path / "g" / "metrics.jsonl")


@pytest.mark.parametrize("script", [online_vpo, gran_dpo, vader_grad, rwr])
def test_each_script_end_to_end(tmp_path, tiny_folders, script):
    (tmp_path / "p.txt").write_text("a red square falling\na blue circle moving left\n")
    size = ["--model", tiny_folders["wan_a14b"], "--num-frames", "9", "--height", "16", "--width", "16",
            "--sample-steps", "4", "--lora-rank", "4", "--prompts", str(tmp_path / "p.txt"),
            "--eval-prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "r")]
    if script is rwr:
        argv = ["--judge", "judge:p_yes", "--rounds", "1", "--prompts-per-round", "2", "--videos-per-prompt", "2",
                "--batch-size", "4", "--eval-seeds", "1", "--num-train-eval-prompts", "2"]
    elif script is vader_grad:
        argv = ["--batch-size", "2", "--steps", "2", "--num-eval-prompts", "2", "--diversity-prompts", "2",
                "--diversity-seeds", "2", "--reward", "toy:quality"]
    else:
        argv = ["--batch-size", "2", "--num-candidates", "2", "--steps", "2", "--num-eval-prompts", "2",
                "--min-margin", "0", "--reward", "toy:quality"] + (["--patch-grid", "1,2,2"] if script is gran_dpo else [])
    out = run_main(script, argv + size)
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert rows[-1]["eval"] and all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert all(math.isfinite(v) for v in rows[-1].values() if isinstance(v, float))
    ck = common.latest_checkpoint(out)
    assert all(os.path.exists(os.path.join(ck, f, "pytorch_lora_weights.safetensors")) for f in ("lora", "lora_transformer_2"))
