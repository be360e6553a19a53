"""common.py: loading every family through from_pretrained, the sampler against the stock pipelines,
truncated gradients, LoRA in the diffusers format, errors, run-folder IO."""
import json
import os
import shutil

import pytest
import torch

import common
import models
import tiny_models

PROMPTS = ["a red square falling", "a blue circle moving left"]


def stock_video(family, folder, prompts, seeds, steps=3, guidance=4.0, lora=None, output_type="pt"):
    import diffusers
    cls = {"wan": diffusers.WanPipeline, "cogvideox": diffusers.CogVideoXPipeline, "ltx": diffusers.LTXPipeline,
           "modelscope": diffusers.TextToVideoSDPipeline}[family]
    pipe = cls.from_pretrained(folder)
    if lora:
        pipe.load_lora_weights(lora)
    F, H, W = tiny_models.SIZES[family]
    kw = dict(prompt=prompts, negative_prompt=[""] * len(prompts), num_frames=F, height=H, width=W,
              num_inference_steps=steps, guidance_scale=guidance, output_type=output_type,
              generator=[torch.Generator().manual_seed(s) for s in seeds])
    if family != "modelscope":
        kw["max_sequence_length"] = {"wan": 512, "cogvideox": 226, "ltx": 128}[family]  # each pipeline's default
    return torch.as_tensor(pipe(**kw).frames)


@pytest.mark.parametrize("family", ["wan", "cogvideox", "ltx", "modelscope"])
def test_sampler_equals_stock_pipeline(tiny_folders, tmp_path, family):
    folder = tiny_folders[family]
    if family == "modelscope":  # steps_offset=1: with 0 the last DDIM step (t=0 -> alpha_0) is the identity,
        import diffusers        # so a sampler that dropped it would pass unseen
        folder = str(tmp_path)
        tiny_models.build(family, folder, scheduler=diffusers.DDIMScheduler.from_pretrained(
            tiny_folders[family], subfolder="scheduler", steps_offset=1))
    model = models.load_model(folder)
    assert model.family == family and model.prediction == {"wan": "flow", "cogvideox": "v", "ltx": "flow",
                                                           "modelscope": "eps"}[family]
    F, H, W = tiny_models.SIZES[family]
    latents, ours = common.sample(model, PROMPTS, [11, 22], F, H, W, steps=3, guidance=4.0)
    stock = stock_video(family, folder, PROMPTS, [11, 22])
    assert ours.shape == stock.shape == (2, F, 3, H, W)
    assert (ours - stock).abs().max() < 1e-4
    if family != "ltx":  # the latents too, before the VAE can hide a difference (LTX returns them packed as tokens)
        assert (latents - stock_video(family, folder, PROMPTS, [11, 22], output_type="latent")).abs().max() < 1e-4


def test_sampler_with_flow_euler_scheduler_equals_stock(tmp_path):
    import diffusers
    tiny_models.build("wan", str(tmp_path), scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    model = models.load_model(str(tmp_path))
    _, ours = common.sample(model, PROMPTS, [5, 6], 9, 16, 16, steps=3, guidance=4.0)
    assert (ours - stock_video("wan", str(tmp_path), PROMPTS, [5, 6])).abs().max() < 1e-4


def test_a_candidate_is_reproducible_from_its_seed(tiny_folders):
    model = models.load_model(tiny_folders["wan"])
    _, both = common.sample(model, PROMPTS, [11, 22], 9, 16, 16, steps=2, guidance=3.0)
    _, alone = common.sample(model, PROMPTS[1:], [22], 9, 16, 16, steps=2, guidance=3.0)
    _, other = common.sample(model, PROMPTS[1:], [23], 9, 16, 16, steps=2, guidance=3.0)
    assert torch.allclose(both[1], alone[0], atol=1e-5)
    assert not torch.allclose(alone[0], other[0], atol=1e-3)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_flow_through_the_last_k_steps_only(tiny_folders, checkpointing):
    model = models.load_model(tiny_folders["wan"])
    params = common.setup_trainable(model, lora_rank=4)
    for n, p in model.denoiser.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    grad_calls = []
    model.denoiser.register_forward_hook(lambda *a: grad_calls.append(torch.is_grad_enabled()))
    _, video = common.sample(model, PROMPTS, [1, 2], 9, 16, 16, steps=4, guidance=3.0, grad_from=2,
                             grad_checkpointing=checkpointing)
    video.mean().backward()
    forward_calls = [g for g in grad_calls][:4]
    assert forward_calls == [False, False, True, True]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all(p.grad is None for p in model.denoiser.parameters() if not p.requires_grad)


def test_checkpointing_gives_the_same_gradient(tiny_folders):
    grads = []
    for ckpt in (False, True):
        model = models.load_model(tiny_folders["wan"])
        torch.manual_seed(0)
        params = common.setup_trainable(model, lora_rank=4)
        for n, p in model.denoiser.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(1))
        _, video = common.sample(model, PROMPTS, [1, 2], 9, 16, 16, steps=3, guidance=3.0, grad_from=1,
                                 grad_checkpointing=ckpt)
        video.mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in params]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_decode_frames_decodes_only_those(toy_model):
    lat = torch.randn(2, 3, 8, 32, 32)
    full = toy_model.decode(lat)
    part = toy_model.decode(lat, frames=[1, 5])
    assert part.shape == (2, 2, 3, 32, 32) and torch.equal(part, full[:, [1, 5]])


def test_lora_saved_loads_in_the_stock_pipeline(tiny_folders, tmp_path):
    model = models.load_model(tiny_folders["wan"])
    common.setup_trainable(model, lora_rank=4)
    with torch.no_grad():
        for n, p in model.denoiser.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
    _, ours = common.sample(model, PROMPTS, [11, 22], 9, 16, 16, steps=3, guidance=4.0)
    model.save_lora(str(tmp_path / "lora"))
    assert os.path.exists(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    base = stock_video("wan", tiny_folders["wan"], PROMPTS, [11, 22])
    with_lora = stock_video("wan", tiny_folders["wan"], PROMPTS, [11, 22], lora=str(tmp_path / "lora"))
    assert (with_lora - base).abs().max() > 1e-3  # the adapter changes the output ...
    assert (with_lora - ours).abs().max() < 1e-4  # ... exactly as it did in our model


@pytest.mark.parametrize("family", ["wan", "cogvideox", "ltx", "modelscope"])
def test_training_targets(tiny_folders, family):
    model = models.load_model(tiny_folders[family])
    g = torch.Generator().manual_seed(0)
    t = common.sample_train_timesteps(model, 3, g)
    x0, eps = torch.randn(3, 4, 2, 2, 2), torch.randn(3, 4, 2, 2, 2)
    xt, target = common.noisy_and_target(model, x0, eps, t)
    if model.prediction == "flow":
        s = (t / 1000).view(-1, 1, 1, 1, 1)
        assert torch.allclose(xt, (1 - s) * x0 + s * eps) and torch.allclose(target, eps - x0)
    else:
        a = model.scheduler.alphas_cumprod[t].float().view(-1, 1, 1, 1, 1)
        assert torch.allclose(xt, a.sqrt() * x0 + (1 - a).sqrt() * eps, atol=1e-6)
        want = a.sqrt() * eps - (1 - a).sqrt() * x0 if model.prediction == "v" else eps
        assert torch.allclose(target, want, atol=1e-6)


def test_clear_errors(tiny_folders, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist: pass a local diffusers folder"):
        models.resolve_model("./no/such/folder")
    with pytest.raises(FileNotFoundError, match="cannot download weights: pass a local folder"):
        models.resolve_model("nobody/not-a-model")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_folders["wan"], broken)
    for f in os.listdir(broken / "transformer"):
        if f.endswith(".safetensors"):
            os.remove(broken / "transformer" / f)
    with pytest.raises(FileNotFoundError, match="no weights in"):
        models.resolve_model(str(broken))
    other = tmp_path / "sd"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="unsupported model family.*supported are"):
        models.resolve_model(str(other))
    with pytest.raises(ValueError, match="must be 4k\\+1"):
        models.check_video_size("wan", 8, 480, 832)
    with pytest.raises(ValueError, match="must be 8k\\+1"):
        models.check_video_size("ltx", 17 + 4, 480, 704)
    with pytest.raises(ValueError, match="multiples of 16"):
        models.check_video_size("cogvideox", 49, 480, 721)
    models.check_video_size("wan", 33, 480, 832)
    with pytest.raises(FileNotFoundError, match="cannot read prompt file"):
        common.load_prompts(str(tmp_path / "missing.txt"))
    (tmp_path / "p.txt").write_text("a cat\n\n a dog \n")
    assert common.load_prompts(str(tmp_path / "p.txt")) == ["a cat", "a dog"]


def test_checkpoint_round_trip_and_atomicity(tiny_folders, tmp_path):
    model = models.load_model(tiny_folders["wan"])
    params = common.setup_trainable(model, lora_rank=4)
    opt = torch.optim.AdamW(params, lr=1e-2)
    sum(p.sum() for p in params).backward()
    opt.step()
    saved = [p.detach().clone() for p in params]
    path = common.save_checkpoint(str(tmp_path / "checkpoints"), 3, model, params, opt, extra={"ref": [1.0]})
    assert os.path.basename(path) == "step-000003" and not os.path.exists(path + ".tmp")
    with torch.no_grad():
        for p in params:
            p.zero_()
    step, extra = common.load_checkpoint(str(tmp_path), params, opt)
    assert step == 3 and extra == {"ref": [1.0]}
    assert all(torch.equal(a, b) for a, b in zip(params, saved))
    assert os.path.exists(os.path.join(path, "lora", "pytorch_lora_weights.safetensors"))


def test_fp16_loss_scaling_keeps_small_gradients_and_is_checkpointed(tmp_path):
    # a trainable fp32 weight (as LoRA is) used in half precision: its true gradient, 1e-8, is below fp16's
    # smallest subnormal (6e-8), so without loss scaling it underflows to zero
    grads = {}
    for mp in ("bf16", "fp16"):  # bf16 needs no scaling: its scaler is a no-op
        w = torch.nn.Parameter(torch.ones(4))
        opt = torch.optim.SGD([w], lr=1.0)
        scaler = common.grad_scaler(mp, "cpu")
        assert scaler.is_enabled() == (mp == "fp16")
        activation = torch.full((4,), 1e-4).half() * w.half()  # half-precision forward, fp32 loss (as per_sample_mse)
        scaler.scale((activation.float() * 1e-4).sum()).backward()
        scaler.unscale_(opt)
        grads[mp] = w.grad.clone()
    assert torch.equal(grads["bf16"], torch.zeros(4))  # the unscaled half-precision backward lost it
    assert torch.allclose(grads["fp16"], torch.full((4,), 1e-8), rtol=1e-2)
    scaler.step(opt)
    scaler.update()
    scaler.update(2.0 ** 7)  # a non-default scale must survive save and resume
    common.save_checkpoint(str(tmp_path / "ck"), 1, None, [w], opt, lora=False, scaler=scaler)
    resumed = common.grad_scaler("fp16", "cpu")
    common.load_checkpoint(str(tmp_path / "ck"), [w], opt, resumed)
    assert resumed.get_scale() == 2.0 ** 7


def test_video_grid_and_metrics(tmp_path):
    videos = torch.rand(3, 4, 3, 16, 16)
    out = common.save_video_grid(str(tmp_path / "grid.mp4"), videos, ["a red square falling"] * 3)
    assert os.path.getsize(out) > 0
    gif = common.save_video_grid(str(tmp_path / "grid.gif"), videos, ["x"] * 3)
    import imageio.v2 as imageio
    frames = imageio.mimread(gif)
    assert len(frames) == 4 and frames[0].shape[1] > 16 * 8  # video upscaled + a caption column
    log = common.MetricsLogger(str(tmp_path))
    log.log({"step": 1, "loss": 0.5})
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": 0.5}


def test_resume_into_a_new_folder_forks_the_run_up_to_the_checkpoint(tmp_path):
    src, new = tmp_path / "run", tmp_path / "fork"
    os.makedirs(src / "checkpoints" / "step-000002")
    torch.save({"step": 2}, src / "checkpoints" / "step-000002" / "state.pt")
    os.makedirs(src / "samples")
    for k in (0, 2, 4):
        (src / "samples" / f"step-{k:06d}.mp4").write_bytes(b"video")
    rows = [{"step": 0, "eval": True}, {"step": 1}, {"step": 2}, {"step": 2, "eval": True}, {"step": 3}]
    (src / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (src / "judge_cache.rank0.jsonl").write_text('{"key": "data-r0-0-0-a", "yes": 1}\n')
    assert common.prepare_run_dir(str(new), "x", str(src / "checkpoints" / "step-000002")) == str(new)
    assert [json.loads(line) for line in open(new / "metrics.jsonl")] == rows[:4]  # up to the checkpoint
    assert sorted(os.listdir(new / "samples")) == ["step-000000.mp4", "step-000002.mp4"]
    assert torch.load(new / "checkpoints" / "step-000002" / "state.pt") == {"step": 2}
    assert os.path.exists(new / "judge_cache.rank0.jsonl")
    assert common.latest_checkpoint(str(new)).endswith("step-000002")  # the fork resumes by itself
    with pytest.raises(FileExistsError, match="already holds a run"):  # a folder with a run is never written over
        common.prepare_run_dir(str(new), "x", str(src))
    assert len(open(new / "metrics.jsonl").readlines()) == 4
    with pytest.raises(FileNotFoundError, match="no such run folder"):  # RWR's cache-only resume: a typo, said
        common.prepare_run_dir(str(new), "x", str(tmp_path / "typo"), need_checkpoint=False)
    assert common.prepare_run_dir(None, "x", str(src)) == str(src)  # the usual resume: its own folder, untouched
    assert len(open(src / "metrics.jsonl").readlines()) == 5
