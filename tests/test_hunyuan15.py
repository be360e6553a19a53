"""HunyuanVideo 1.5 (family "hunyuan15") against the stock HunyuanVideo15Pipeline on tiny random components saved
and reloaded through from_pretrained: prompt encoding, the sampler (latents and videos), the LoRA round trip,
the early size check, noising/targets, the partial decode, and the four scripts end to end."""
import json
import math
import os

import pytest
import torch

import common
import models
import tiny_models
from helpers import assert_model_card_matches, run_main

# the second prompt quotes glyph text, so the ByT5 stream is non-empty for it (and empty for the first)
PROMPTS = ["a red square falling", 'a sign that reads "hello" and "bye"']
F, H, W = tiny_models.SIZES["hunyuan15"]


def stock_video(folder, prompts, seeds, steps=3, guidance=4.0, lora=None, output_type="pt"):
    """HunyuanVideo15Pipeline's own output. Its guidance scale lives in the guider (no guidance_scale argument);
    its VAE decodes a batch only with slicing (diffusers 0.42's VAE attention mask breaks on batch > 1, PR #13133);
    it has no load_lora_weights, so a LoRA goes through the transformer's own PeftAdapterMixin loader."""
    import diffusers
    pipe = diffusers.HunyuanVideo15Pipeline.from_pretrained(folder)
    pipe.guider = pipe.guider.new(guidance_scale=guidance)
    pipe.vae.enable_slicing()
    if lora:
        pipe.transformer.load_lora_adapter(lora, weight_name="pytorch_lora_weights.safetensors", prefix="transformer")
    out = pipe(prompt=prompts, negative_prompt=[""] * len(prompts), num_frames=F, height=H, width=W,
               num_inference_steps=steps, output_type=output_type,
               generator=[torch.Generator().manual_seed(s) for s in seeds])
    return torch.as_tensor(out.frames)


def test_prompt_encoding_equals_the_pipeline(tiny_folders):
    import diffusers
    model = models.load_model(tiny_folders["hunyuan15"])
    assert model.family == "hunyuan15" and model.prediction == "flow" and model.text_encoder_2 is not None
    emb, mask = model.encode_prompts(PROMPTS + [""])
    pipe = diffusers.HunyuanVideo15Pipeline.from_pretrained(tiny_folders["hunyuan15"])
    e1, m1, e2, m2 = pipe.encode_prompt(PROMPTS + [""], device="cpu", batch_size=3)
    L = model.max_sequence_length
    assert L == pipe.tokenizer_max_length and emb.shape[1] == L + pipe.tokenizer_2_max_length
    assert torch.equal(mask[:, :L].float(), m1) and torch.equal(mask[:, L:].float(), m2)
    assert (emb[:, :L, : e1.shape[2]] - e1).abs().max() < 1e-6 and (emb[:, L:, : e2.shape[2]] - e2).abs().max() < 1e-6
    assert emb[:, L:, e2.shape[2]:].abs().max() == 0  # the narrower ByT5 stream is zero-padded
    assert m2[0].sum() == 0 and m2[1].sum() > 0  # no glyph text / quoted glyph text
    again, _ = model.encode_prompts(PROMPTS[1:])  # cached, and independent of the batch
    assert torch.equal(again[0], emb[1])


def test_sampler_equals_stock_pipeline(tiny_folders):
    folder = tiny_folders["hunyuan15"]
    model = models.load_model(folder)
    assert model.latent_shape(F, H, W) == (4, 3, 2, 2)
    latents, ours = common.sample(model, PROMPTS, [11, 22], F, H, W, steps=3, guidance=4.0)
    stock = stock_video(folder, PROMPTS, [11, 22])
    assert ours.shape == stock.shape == (2, F, 3, H, W)
    assert ((stock > 0.01) & (stock < 0.99)).float().mean() > 0.5  # not saturated: the comparison means something
    assert (ours - stock).abs().max() < 1e-4
    assert (latents - stock_video(folder, PROMPTS, [11, 22], output_type="latent")).abs().max() < 1e-4
    _, alone = common.sample(model, PROMPTS[1:], [22], F, H, W, steps=3, guidance=4.0)  # a candidate alone
    assert (alone[0] - ours[1]).abs().max() < 1e-5
    _, no_cfg = common.sample(model, PROMPTS, [11, 22], F, H, W, steps=3, guidance=1.0)  # the guider's "disabled"
    assert (no_cfg - stock_video(folder, PROMPTS, [11, 22], guidance=1.0)).abs().max() < 1e-4


def test_lora_round_trip_with_the_stock_pipeline(tiny_folders, tmp_path):
    import diffusers
    from safetensors import safe_open
    folder = tiny_folders["hunyuan15"]
    model = models.load_model(folder)
    params = common.setup_trainable(model, lora_rank=4, lora_alpha=8)
    names = [n for n, p in model.denoiser.named_parameters() if p.requires_grad]
    assert any(".transformer_blocks." in n or n.startswith("transformer_blocks.") for n in names)
    assert all(any(t in n for t in ("to_q", "to_k", "to_v", "to_out.0")) for n in names) and len(params) == len(names)
    with torch.no_grad():
        for n, p in model.denoiser.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
    _, ours = common.sample(model, PROMPTS, [11, 22], F, H, W, steps=3, guidance=4.0)
    model.save_lora(str(tmp_path / "lora"))
    with safe_open(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"), "pt") as f:
        assert all(k.startswith("transformer.") for k in f.keys())
    assert not hasattr(diffusers.HunyuanVideo15Pipeline, "load_lora_weights")  # README: load_lora_adapter instead
    base = stock_video(folder, PROMPTS, [11, 22])
    with_lora = stock_video(folder, PROMPTS, [11, 22], lora=str(tmp_path / "lora"))
    assert (with_lora - base).abs().max() > 1e-3  # the adapter changes the output ...
    assert (with_lora - ours).abs().max() < 1e-4  # ... exactly as in our model, alpha/rank = 2 included


def test_alias_size_check_and_defaults_before_anything_loads(tiny_folders, tmp_path, monkeypatch):
    import online_vpo
    assert models.MODEL_ALIASES["hunyuanvideo1.5"] == "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v"
    with pytest.raises(FileNotFoundError, match="cannot download weights"):  # offline: a clear error, not a crash
        models.resolve_model("hunyuanvideo1.5")
    folder = tiny_folders["hunyuan15"]
    assert models.resolve_model(folder) == (folder, "hunyuan15")
    with pytest.raises(ValueError, match="must be 4k\\+1"):
        models.check_video_size("hunyuan15", 120, 480, 848)
    with pytest.raises(ValueError, match="multiples of 16"):
        models.check_video_size("hunyuan15", 121, 480, 840)
    models.check_video_size("hunyuan15", 121, 480, 848)
    assert models.FAMILIES["hunyuan15"].defaults == dict(num_frames=121, height=480, width=848, sample_steps=50,
                                                         guidance=6.0, fps=24)
    # the checkpoint's own guider and target size win: the tiny one has guidance 4 and target_size 32
    assert models.model_defaults(folder, "hunyuan15") == dict(num_frames=121, height=32, width=32, sample_steps=50,
                                                              guidance=4.0, fps=24)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded before the size check"))
    with pytest.raises(ValueError, match="must be 4k\\+1"):
        run_main(online_vpo, ["--model", folder, "--num-frames", "8", "--height", "32", "--width", "32",
                              "--out", str(tmp_path / "bad")])
    with pytest.raises(ValueError, match="multiples of 16"):
        run_main(online_vpo, ["--model", folder, "--num-frames", "9", "--height", "24", "--width", "32",
                              "--out", str(tmp_path / "bad2")])
    assert not os.path.exists(tmp_path / "bad") and not os.path.exists(tmp_path / "bad2")


def test_noising_and_targets_match_the_scheduler(tiny_folders):
    model = models.load_model(tiny_folders["hunyuan15"])
    sch = model.scheduler
    g = torch.Generator().manual_seed(0)
    t = common.sample_train_timesteps(model, 64, g)
    assert t.min() > 0 and t.max() <= 1000 and t.float().mean() > 500  # shift 5 leans to high noise
    x0 = torch.randn(2, *model.latent_shape(F, H, W), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    timesteps = model.set_timesteps(4, x0.shape[1:])
    for i, ti in enumerate(timesteps):
        tt = ti.expand(2)
        xt, target = common.noisy_and_target(model, x0, eps, tt)
        sch._step_index = i  # the scheduler's own forward process at its i-th sigma
        assert torch.allclose(xt, sch.scale_noise(x0, tt, eps), atol=1e-6)
        assert torch.allclose(target, eps - x0)
        assert torch.allclose(common.predicted_x0(model, xt, target, tt), x0, atol=1e-5)
        # one Euler step with the true velocity lands exactly on the next noise level
        nxt = sch.step(target, ti, xt, return_dict=False)[0]
        s_next = sch.sigmas[i + 1]
        assert torch.allclose(nxt, (1 - s_next) * x0 + s_next * eps, atol=1e-5)
    # the sampler's sigmas are the pipeline's: linspace(1, 0, steps + 1)[:-1] then shifted by 5
    s = torch.linspace(1, 0, 5)[:-1]
    assert torch.allclose(sch.sigmas[:-1], 5 * s / (1 + 4 * s), atol=1e-6)


def test_partial_decode_equals_the_full_decode(tiny_folders):
    model = models.load_model(tiny_folders["hunyuan15"])
    lat = torch.randn((2, *model.latent_shape(17, H, W)), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model.decode(lat)
        assert full.shape == (2, 17, 3, H, W)
        for frames in [[0], [1], [4], [5], [16], [0, 5], [2, 3, 8]]:
            part = model.decode(lat, frames=frames)
            assert torch.allclose(part, full[:, frames], atol=1e-5), (frames, (part - full[:, frames]).abs().max())


# ---- the four scripts, end to end on the tiny checkpoint, 2 tiny steps each, through their real main -------------
SIZE = ["--num-frames", str(F), "--height", str(H), "--width", str(W)]


def rows_of(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def assert_lora_checkpoint(out):
    """The final LoRA and its model card (figures = metrics.jsonl; the snippet uses the DiT's loader, as
    HunyuanVideo15Pipeline has no load_lora_weights)."""
    assert os.path.exists(os.path.join(common.latest_checkpoint(out), "lora", "pytorch_lora_weights.safetensors"))
    return assert_model_card_matches(out, loader="pipe.transformer.load_lora_adapter(")


def test_online_vpo_end_to_end(tmp_path, tiny_folders):
    import online_vpo
    from test_online_vpo import FAST
    out = str(tmp_path / "vpo")
    run_main(online_vpo, FAST + SIZE + ["--model", tiny_folders["hunyuan15"], "--reward", "toy:temporal", "--steps", "2",
                                        "--out", out, "--eval-every", "99"])
    rows = rows_of(out)
    assert [r["step"] for r in rows if not r.get("eval")] == [1, 2] and rows[-1]["eval"]
    assert all(math.isfinite(r["loss"]) for r in rows if not r.get("eval"))
    assert json.load(open(os.path.join(out, "config.json")))["family"] == "hunyuan15"
    card = assert_lora_checkpoint(out)
    import diffusers  # the card's own snippet, run as written (its base model is the tiny folder --model named)
    snippet = card.split("```python\n")[1].split("```")[0]
    assert "HunyuanVideo15Pipeline.from_pretrained" in snippet and "load_lora_weights" not in snippet
    scope = {"diffusers": diffusers, "torch": torch}
    exec(snippet.replace("path/to/this/folder", os.path.join(common.latest_checkpoint(out), "lora")), scope)
    assert scope["pipe"].transformer.peft_config and any("lora_B" in n for n, _ in
                                                         scope["pipe"].transformer.named_parameters())


def test_vader_grad_end_to_end(tmp_path, tiny_folders):
    import vader_grad
    from test_vader_grad import FAST
    out = run_main(vader_grad, FAST + SIZE + ["--model", tiny_folders["hunyuan15"], "--reward", "toy:quality",
                                              "--steps", "2", "--sample-steps", "2", "--out", str(tmp_path / "vader")])
    train = [r for r in rows_of(out) if not r.get("eval")]
    assert [r["step"] for r in train] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in train)  # the gradient reached the LoRA
    assert_lora_checkpoint(out)


def test_vlm_feedback_rwr_end_to_end(tmp_path, tiny_folders):
    import vlm_feedback_rwr
    from test_vlm_feedback_rwr import FAST
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square falling\na blue circle moving left\na green triangle moving right\n"
                       "a red square pushing a blue circle\n")  # toy-world prompts: the toy judge parses them
    out = run_main(vlm_feedback_rwr, FAST + SIZE + ["--model", tiny_folders["hunyuan15"], "--judge", "judge:p_yes",
                                                    "--prompts", str(prompts), "--eval-prompts", str(prompts),
                                                    "--out", str(tmp_path / "rwr")])
    rows = rows_of(out)
    assert [r["round"] for r in rows if r.get("eval")] == [0, 1]
    assert any("epoch" in r for r in rows)
    assert_lora_checkpoint(out)


def test_gran_dpo_end_to_end(tmp_path, tiny_folders):
    import gran_dpo
    from test_gran_dpo import FAST
    out = str(tmp_path / "gran")
    run_main(gran_dpo, FAST + SIZE + ["--model", tiny_folders["hunyuan15"], "--reward", "toy:quality", "--steps", "2",
                                      "--patch-grid", "1,2,2", "--out", out])
    train = [r for r in rows_of(out) if not r.get("eval")]
    assert [r["step"] for r in train] == [1, 2]
    assert all(math.isfinite(r["video_loss"]) and math.isfinite(r["patch_loss"]) for r in train)
    assert_lora_checkpoint(out)
