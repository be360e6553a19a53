"""Memory plan: the peak GPU memory PER RANK of each script's sampling and update phases, at real model
sizes and full video length, planned on a CPU without allocating a single weight.

Every model is built from its real config under `torch._subclasses.fake_tensor.FakeTensorMode` (tensors
with shapes and dtypes but no storage), wrapped in our own `models.VideoModel`, and run through the SAME
code the scripts run (`common.setup_trainable`, `common.sample`, `common.Reference`, `models.VideoModel.denoise`,
`distributed.shard`), with bf16 autocast and bf16 frozen weights as `--mixed-precision bf16` does. Memory is
measured with torch's own trackers (`torch.distributed._tools`): `MemTracker` for one rank, and
`FSDPMemTracker` for FSDP2 over 8 ranks simulated in one process by torch's fake process group. On a CPU
the fake attention dispatches to the flash kernel (output + logsumexp saved), as SDPA does on a GPU.

Phases (one rank, LoRA r16, bf16):
  sample : one video at a time (`--sample-batch-size 1`), CFG, decode, reward (online_vpo/gran_dpo:
           VideoScore-v1.1, vlm_feedback_rwr: a Qwen2.5-VL-7B judge)
  update : DPO, one pair per rank (online_vpo, gran_dpo, `--loss dpo`): reference + policy forward, backward,
           AdamW step; RWR: one video per rank; VADER: K grad-carrying sampler steps, decode, aesthetic reward
           (CLIP ViT-L/14), backward, AdamW step
Validations (printed as ratios): (a) the fake estimate vs the same code on real tensors (tiny Wan, CPU);
(b) VADER's published ModelScope ladder; (c) a GPU measurement where one was lent (`--device cuda`).

    python benchmarks/memory_plan.py                      # the whole plan (~15 min a model on 2 CPU cores), resumable
    python benchmarks/memory_plan.py --models wan2.1-1.3b --sizes 480x832x81
    python benchmarks/memory_plan.py --smoke              # tiny Wan, seconds (CI)
    python benchmarks/memory_plan.py --report             # the tables of runs/memory_plan.json, else of the shipped plan
    python benchmarks/memory_plan.py --out benchmarks/results/memory_plan.json --overwrite   # extend the shipped plan
Writes runs/memory_plan.json (--out, one row per configuration; not committed) and prints the README table.
The shipped plan, benchmarks/results/memory_plan.json, is rewritten only with an explicit --out and
--overwrite, and never by --smoke (plumbing rows, not a plan), as benchmarks/claims.py refuses a --smoke run
into its shipped results.
"""
import argparse
import contextlib
import json
import os
import re
import sys
import time
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import models

GiB = 2 ** 30
p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--models", default="wan2.1-1.3b,wan2.1-14b,wan2.2-5b,cogvideox-5b,ltx-video,modelscope-1.7b",
               help="comma-separated models to plan")
p.add_argument("--sizes", default="480x832x33,480x832x81,720x1280x33,720x1280x81", help="HxWxF video sizes")
p.add_argument("--vader-sizes", default="480x832x17,240x416x33",
               help="extra, smaller sizes planned for VADER (its decoder backward is what stops it first)")
p.add_argument("--scripts", default="online_vpo,vlm_feedback_rwr,vader_grad,flow_grpo",
               help="scripts to plan (gran_dpo's rows are online_vpo's: the same reward model and DPO update)")
p.add_argument("--ranks", default="1,8", help="rank counts to plan: 1 (one GPU) and/or 8 (FSDP over 8 GPUs)")
p.add_argument("--gpu-gib", type=float, default=80.0, help="GPU memory the table checks against")
p.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (0 = full fine-tune rows are added for Wan)")
p.add_argument("--smoke", action="store_true", help="tiny Wan only, fake vs real (CI)")
p.add_argument("--skip-validation", action="store_true", help="plan only")
SHIPPED_PLAN = os.path.join(ROOT, "benchmarks", "results", "memory_plan.json")
SHIPPED = [os.path.join(ROOT, "benchmarks", "results")]  # committed results: rewritten only with --overwrite
p.add_argument("--out", default=os.path.join(ROOT, "runs", "memory_plan.json"),
               help="JSON output (default runs/memory_plan.json, not committed; --report falls back to the shipped "
                    "benchmarks/results/memory_plan.json when it does not exist)")
p.add_argument("--overwrite", action="store_true",
               help="allow rewriting the shipped plan (--out benchmarks/results/memory_plan.json); never with --smoke")
p.add_argument("--fresh", action="store_true", help="recompute rows already in the JSON")
p.add_argument("--report", action="store_true", help="print the tables from the JSON only, computing nothing")

# ----------------------------------------------------------------------------------------------
# The real architectures (their published config.json values)
# ----------------------------------------------------------------------------------------------
WAN = dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
           cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)
T5_XXL = dict(UMT5_XXL, vocab_size=32128)
MODELS = {  # family, denoiser class + config, VAE class + config, text encoder, prompt length, scheduler
    "wan2.1-1.3b": ("wan", "WanTransformer3DModel", dict(WAN, num_attention_heads=12, ffn_dim=8960, num_layers=30),
                    "AutoencoderKLWan", {}, ("UMT5", UMT5_XXL), 512, ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0))),
    "wan2.1-14b": ("wan", "WanTransformer3DModel", dict(WAN, num_attention_heads=40, ffn_dim=13824, num_layers=40),
                   "AutoencoderKLWan", {}, ("UMT5", UMT5_XXL), 512, ("FlowMatchEulerDiscreteScheduler", dict(shift=5.0))),
    "wan2.2-5b": ("wan", "WanTransformer3DModel", dict(WAN, num_attention_heads=24, ffn_dim=14336, num_layers=30,
                                                       in_channels=48, out_channels=48),
                  "AutoencoderKLWan", dict(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12,
                                           out_channels=12, patch_size=2, scale_factor_spatial=16,
                                           latents_mean=[0.0] * 48, latents_std=[1.0] * 48),
                  ("UMT5", UMT5_XXL), 512, ("FlowMatchEulerDiscreteScheduler", dict(shift=5.0))),
    "cogvideox-5b": ("cogvideox", "CogVideoXTransformer3DModel",
                     dict(num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True),
                     "AutoencoderKLCogVideoX", dict(scaling_factor=0.7), ("T5", T5_XXL), 226,
                     ("CogVideoXDPMScheduler", dict(prediction_type="v_prediction", timestep_spacing="trailing",
                                                    rescale_betas_zero_snr=True, beta_schedule="scaled_linear"))),
    "ltx-video": ("ltx", "LTXVideoTransformer3DModel", {}, "AutoencoderKLLTXVideo", {}, ("T5", T5_XXL), 128,
                  ("FlowMatchEulerDiscreteScheduler", {})),
    "modelscope-1.7b": ("modelscope", "UNet3DConditionModel", {}, "AutoencoderKL",
                        dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                             up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=2),
                        ("CLIP", dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                      num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu")), 77,
                        ("DDIMScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                               clip_sample=False))),
    # the tiny Wan of the validation (a): same classes, a few MB
    "tiny-wan": ("wan", "WanTransformer3DModel", dict(WAN, num_attention_heads=2, attention_head_dim=32, ffn_dim=128,
                                                      num_layers=2, text_dim=64, freq_dim=32, rope_max_seq_len=64),
                 "AutoencoderKLWan", dict(base_dim=16), ("UMT5", dict(vocab_size=64, d_model=64, d_kv=16, d_ff=128,
                                                                      num_layers=2, num_heads=4,
                                                                      feed_forward_proj="gated-gelu")), 16,
                 ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0))),
}
REWARD_OF = {"online_vpo": "videoscore", "gran_dpo": "videoscore", "flow_grpo": "videoscore",
             "vlm_feedback_rwr": "judge", "vader_grad": "aesthetic"}


class FakeTokenizer:
    """Stands in for the tokenizer (no vocabulary files offline): full-length ids, as a long prompt gives."""

    def __init__(self, length):
        self.length = length

    def __call__(self, prompts, max_length=None, **kw):
        n = max_length or self.length
        return types.SimpleNamespace(input_ids=torch.ones(len(prompts), n, dtype=torch.long),
                                     attention_mask=torch.ones(len(prompts), n, dtype=torch.long))


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(name, dtype=torch.bfloat16):
    """A models.VideoModel of the real architecture: frozen parts created directly in `dtype` (a fake
    tensor cannot be cast in place, and a real run gets them in bf16 from from_pretrained too)."""
    import diffusers
    import transformers
    family, den_cls, den_cfg, vae_cls, vae_cfg, (text_kind, text_cfg), max_len, (sch_cls, sch_cfg) = MODELS[name]
    with default_dtype(dtype):
        den = getattr(diffusers, den_cls)(**den_cfg)
        vae = getattr(diffusers, vae_cls)(**vae_cfg).eval().requires_grad_(False)
        if text_kind == "CLIP":
            text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_cfg))
        else:
            cls, cfg = ((transformers.UMT5EncoderModel, transformers.UMT5Config) if text_kind == "UMT5"
                        else (transformers.T5EncoderModel, transformers.T5Config))
            text = cls(cfg(**text_cfg, dropout_rate=0.0))
        text.eval().requires_grad_(False)
    with host_side():
        scheduler = getattr(diffusers, sch_cls)(**sch_cfg)
    step = scheduler.step
    scheduler.step = lambda *a, **k: on_host(step)(*a, **k)  # (indexes its tables by the timestep)
    prediction = "flow" if "FlowMatch" in sch_cls else ("v" if sch_cfg.get("prediction_type") == "v_prediction" else "eps")
    return models.FAMILIES[family](name, prediction, FakeTokenizer(max_len), text, den, vae, scheduler, max_len,
                                   expand_timesteps=name == "wan2.2-5b")


def host_side():
    """Real tensors inside the fake mode: a scheduler's few timesteps and sigmas are host-side bookkeeping (it
    reads them back with .item(), which a shape-only tensor cannot answer); they never hold video memory."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    return unset_fake_temporarily()


def on_host(fn):
    """fn, run with real tensors (see host_side)."""
    def wrapped(*a, **k):
        with host_side():
            return fn(*a, **k)
    return wrapped


def timestep_list(set_timesteps):
    """The sampler's timesteps as a list of real scalars (iterating a tensor inside the fake mode yields
    shape-only elements, and a scheduler indexes its tables with them)."""
    def wrapped(*a, **k):
        with host_side():
            return list(set_timesteps(*a, **k).unbind())
    return wrapped


@contextlib.contextmanager
def no_adapter_move():
    """peft moves each new adapter to its base layer's device with `.to()`, which swaps parameters in place, and a
    fake parameter cannot be swapped: under the fake mode everything is on the one device already, so those
    moves (device only, no dtype) are skipped."""
    from peft.tuners.lora.layer import LoraLayer
    to = torch.nn.Module.to

    def device_only_to(self, *a, **k):
        if all(isinstance(v, (str, torch.device)) for v in list(a) + list(k.values())):
            return self
        return to(self, *a, **k)
    with mock_attr(LoraLayer, "_move_adapter_to_device_of_base_layer", lambda self, *a, **k: None), \
            mock_attr(torch.nn.Module, "to", device_only_to):
        yield


@contextlib.contextmanager
def mock_attr(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


# ----------------------------------------------------------------------------------------------
# Reward models (real configs), run on the frames and sizes their preprocessing gives
# ----------------------------------------------------------------------------------------------
def build_reward(kind, dtype=torch.bfloat16):
    """(module holding the weights, fn(videos [B, F, 3, H, W] in [0, 1]) -> [B] scores)."""
    import transformers
    import rewards
    with default_dtype(dtype):
        if kind == "videoscore":  # TIGER-Lab/VideoScore-v1.1: Mantis-Idefics2-8B (Mistral-7B + SigLIP-so400m) + 5 heads
            cfg = transformers.Idefics2Config(
                text_config=dict(model_type="mistral", vocab_size=32003, hidden_size=4096, intermediate_size=14336,
                                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
                vision_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                                   image_size=980, patch_size=14),
                perceiver_config=dict(resampler_n_latents=64, resampler_depth=3, resampler_n_heads=16,
                                      resampler_head_dim=96, num_key_value_heads=4, hidden_size=4096))
            net = torch.nn.ModuleDict({"model": transformers.Idefics2Model(cfg), "head": torch.nn.Linear(4096, 5)})
        elif kind == "judge":  # Qwen/Qwen2.5-VL-7B-Instruct
            cfg = transformers.Qwen2_5_VLConfig(
                text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                                 num_key_value_heads=4, vocab_size=152064,
                                 rope_scaling=dict(type="mrope", mrope_section=[16, 24, 24])),
                vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                                   fullatt_block_indexes=[7, 15, 23, 31]))
            net = transformers.Qwen2_5_VLForConditionalGeneration(cfg)
        else:  # aesthetic: CLIP ViT-L/14 + the LAION MLP 768-1024-128-64-16-1 (VADER's default reward)
            vis = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
                hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
                patch_size=14, projection_dim=768))
            dims = [768, 1024, 128, 64, 16, 1]
            mlp = torch.nn.Sequential(*[torch.nn.Linear(a, b) for a, b in zip(dims, dims[1:])])
            net = torch.nn.ModuleDict({"vision": vis, "mlp": mlp})
    net.eval().requires_grad_(False)

    def videoscore(videos):  # rewards.VideoScore: up to 48 frames, longest side 980, 64 perceiver tokens per frame
        frames = videos[:, rewards.videoscore_frame_indices(videos.shape[1])]
        B, F = frames.shape[:2]
        pix = rewards.resize_normalize(frames, rewards.idefics2_size(*videos.shape[-2:]), [0.5] * 3, [0.5] * 3,
                                       "bilinear", clamp=True).to(dtype).flatten(0, 1)
        m = net["model"]  # Idefics2Model.forward, its image branch called directly (its real-image test indexes
        # by data, which shape-only tensors cannot): vision tower -> perceiver -> Mistral over the merged sequence
        ph, pw = pix.shape[-2] // 14, pix.shape[-1] // 14
        feats = m.vision_model(pixel_values=pix, patch_attention_mask=torch.ones(B * F, ph, pw, dtype=torch.bool)
                               ).last_hidden_state
        img = m.connector(feats, attention_mask=torch.ones(B * F, ph * pw, dtype=torch.bool))
        text = torch.zeros(B, 160, 4096, dtype=img.dtype)  # the query's ~160 text tokens
        seq = torch.cat([text, img.reshape(B, -1, 4096)], 1)
        hidden = m.text_model(inputs_embeds=seq).last_hidden_state
        return net["head"](hidden[:, -1]).float()[:, 0]

    def judge(videos):  # rewards.VLMJudge: 8 frames, longer side 448, Qwen's 28-pixel grid, one forward
        idx = torch.linspace(0, videos.shape[1] - 1, 8).round().long()
        frames = videos[:, idx]
        B, F, _, H, W = frames.shape
        scale = 448 / max(H, W)
        h, w = max(28, round(H * scale / 28) * 28), max(28, round(W * scale / 28) * 28)
        x = rewards.resize_normalize(frames, (h, w), rewards.CLIP_MEAN, rewards.CLIP_STD, "bicubic", clamp=True)
        # Qwen's patches: [t/2 * h/14 * w/14, 3 * 2 * 14 * 14]
        patches = x.reshape(B, F // 2, 2, 3, h // 14, 14, w // 14, 14).permute(0, 1, 4, 6, 3, 2, 5, 7)
        patches = patches.reshape(-1, 3 * 2 * 14 * 14).to(dtype)
        with host_side():  # (the grid and the window/position indices it yields are host-side index arithmetic)
            grid = torch.tensor([[F // 2, h // 14, w // 14]] * B)
            vis = net.model.visual(patches, grid_thw=grid)
        vis = vis.pooler_output if hasattr(vis, "pooler_output") else vis
        seq = torch.cat([torch.zeros(B, 60, 3584, dtype=vis.dtype), vis.reshape(B, -1, 3584)], 1)
        pos = torch.arange(seq.shape[1]).expand(3, B, -1)  # (M-RoPE ids; their values do not change memory)
        hidden = net.model.language_model(inputs_embeds=seq, position_ids=pos).last_hidden_state
        return net.lm_head(hidden[:, -1:]).float()[:, 0, :2].softmax(-1)[:, 0]

    def aesthetic(videos):  # rewards.CLIPFrameReward: every decoded frame at 224x224
        x = rewards.resize_center_crop(videos, 224, rewards.CLIP_MEAN, rewards.CLIP_STD,
                                       **rewards.CLIP_PREPROCESS["aesthetic"]).flatten(0, 1).to(dtype)
        emb = net["vision"](pixel_values=x).image_embeds
        emb = emb / emb.norm(dim=-1, keepdim=True)
        return net["mlp"](emb).float().view(videos.shape[0], -1).mean(1)

    return net, {"videoscore": videoscore, "judge": judge, "aesthetic": aesthetic}[kind]


# ----------------------------------------------------------------------------------------------
# Trackers
# ----------------------------------------------------------------------------------------------
def planning_tracker(tracker_cls):
    """torch's tracker, with two changes for planning whole phases of multi-billion-parameter models:
    - it hooks the gradient of EVERY parameter it meets, and a frozen one (the base under LoRA, the text
      encoder, the reward) cannot take a hook: only the trainable ones are hooked;
    - after every op it walks ALL modules seen so far to update their own peaks (hours for a phase of
      thousands of module calls): only the global peak, which is what the plan reports, is updated."""
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, _MemRefType

    class Tracker(tracker_cls):
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            out = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
            for q in module.parameters():
                if install_grad_hooks and q.requires_grad and self._param_to_grad_hook_handles.get(q) is None:
                    def hook(g):  # (returns None: a tensor hook's return value replaces the gradient)
                        self._update_and_maybe_create_winfos(g, _MemRefType.GRAD)
                    self._param_to_grad_hook_handles[q] = (q.register_hook(hook),
                                                           q.register_post_accumulate_grad_hook(lambda r: hook(r.grad)))
            return out

        def _update_peak_stats(self, peak_state):
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap[_TOTAL_KEY]:
                    self._peak_mem[dev] = snap[_TOTAL_KEY]
                    self._peak_mem_snap[dev] = dict(snap)
    return Tracker


class Phase(torch.nn.Module):
    """One root module around a whole phase: MemTracker then accepts the denoiser being called many times
    (every sampler step) as calls inside ONE iteration of the root."""

    def __init__(self, fn, parts):
        super().__init__()
        self.parts, self.fn = torch.nn.ModuleList(parts), fn

    def forward(self):
        return self.fn()


def measure(fn, parts, optimizer, tensors=(), fsdp_root=None):
    """Run fn under torch's tracker; returns (peak bytes, {category: bytes at the peak})."""
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
    param, buffer, other = _MemRefType.PARAM, _MemRefType.BUFFER, _MemRefType.OTH
    if fsdp_root is not None:
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker, _FSDPRefType
        tracker = planning_tracker(FSDPMemTracker)(fsdp_root, optimizer)
        others = [m for m in parts if m is not fsdp_root]
        # its categories: replicated weights are "unsharded", the reference's copy is sharded like the policy's
        param, buffer, other = _FSDPRefType.UNSHARDED_PARAM, _FSDPRefType.BUFFER, _FSDPRefType.SHARDED_PARAM
    else:
        tracker, others = planning_tracker(MemTracker)(), parts
    for m in others:  # weights resident through the phase (FSDPMemTracker's own track_external is a no-op)
        for q in m.parameters():
            tracker._update_and_maybe_create_winfos(q, param)
        for b in m.buffers():
            tracker._update_and_maybe_create_winfos(b, buffer)
    for t in tensors:  # the DPO reference's copy of the trainable weights
        tracker._update_and_maybe_create_winfos(t.to_local() if hasattr(t, "to_local") else t, other)
    if fsdp_root is None and optimizer is not None:
        tracker.track_external(optimizer)
    phase = Phase(fn, parts)
    with tracker:
        loss = phase()  # the forward part inside the root module (torch's module tracking needs the backward
        after = None
        if optimizer is not None:  # outside it), then the backward and AdamW's step
            loss.backward()
            optimizer.step()
            after = next(iter(tracker.get_tracker_snapshot().values()))  # weights, gradients and AdamW state
            optimizer.zero_grad(set_to_none=True)
    snap = next(iter(tracker.get_tracker_snapshot("peak").values()))
    name = lambda d: {str(k).split(".")[-1].lower(): v for k, v in d.items() if k != "Total" and v}  # noqa: E731
    return snap["Total"], name(snap), (name(after) if after else {})


# ----------------------------------------------------------------------------------------------
# The phases, as the scripts run them
# ----------------------------------------------------------------------------------------------
def phase_fns(model, reward_fn, F, H, W, autocast, kind, k=1, decode="all", steps=2, checkpointing=True, guidance=5.0,
              frozen=None, decoder_grad="prefix"):
    frames = {"all": None, "one": [F // 2], "alternate": list(range(0, F, 2))}[decode]

    def sample():  # common.sample_and_score: sampler with CFG, decode, reward, all under no_grad
        with torch.no_grad(), autocast:
            _, video = common.sample(model, ["a prompt"], [0], F, H, W, steps, guidance)
            reward_fn(video)

    def vader():  # vader_grad.py: the last K steps carry gradient, decoded frames, -reward
        with autocast:
            _, video = common.sample(model, ["a prompt"], [0], F, H, W, max(steps, k + 1) if k < 99 else steps, guidance,
                                     grad_from=(max(steps, k + 1) - k) if k < 99 else 0,
                                     grad_checkpointing=checkpointing, decode_frames=frames,
                                     decoder_prefix_grad=decoder_grad == "prefix")
            return -reward_fn(video).mean()

    def dpo(ref, n=1):  # online_vpo.py step 5: reference then policy on [winners; losers], one (t, eps) per pair
        shape = model.latent_shape(F, H, W)
        x0, eps = torch.randn(2 * n, *shape), torch.randn(2 * n, *shape)
        t = common.sample_train_timesteps(model, n, torch.Generator().manual_seed(0)).repeat(2)
        x_t, target = common.noisy_and_target(model, x0, eps, t)
        emb, mask = model.encode_prompts(["a prompt"] * 2 * n)
        if frozen is not None:  # --offload-frozen: text encoder, VAE and reward freed for the update
            frozen.away()
        with autocast:
            ref_pred = ref.forward(model.denoise, x_t, t, emb, mask)
            pred = model.denoise(x_t, t, emb, mask)
        e_w, e_l = common.per_sample_mse(pred, target).chunk(2)
        r_w, r_l = common.per_sample_mse(ref_pred, target).chunk(2)
        return torch.nn.functional.logsigmoid(-2500 * ((e_w - r_w) - (e_l - r_l))).mean().neg()

    def rwr(n=1):  # vlm_feedback_rwr.py: the weighted flow-matching loss on stored latents
        shape = model.latent_shape(F, H, W)
        x0, eps = torch.randn(n, *shape), torch.randn(n, *shape)
        t = common.sample_train_timesteps(model, n, torch.Generator().manual_seed(0))
        x_t, target = common.noisy_and_target(model, x0, eps, t)
        emb, mask = model.encode_prompts(["a prompt"] * n)
        with autocast:
            pred = model.denoise(x_t, t, emb, mask)
        return common.per_sample_mse(pred, target).mean()

    def grpo_sample(window):  # flow_grpo.py's rollout: the SDE sampler keeping its window's transitions, reward
        import flow_grpo
        with torch.no_grad():
            kw = dict(num_frames=F, height=H, width=W, steps=steps, guidance=guidance)
            part = flow_grpo.sde_sample(model, ["a prompt"], [0], kw, window, 0.7, autocast)
            reward_fn(part.pop("videos"))
        return part

    def grpo(ref, n=1):  # flow_grpo.py step 3: one trained transition of n videos (CFG batched), reference first
        import flow_grpo
        shape = model.latent_shape(F, H, W)
        x, x_next = torch.randn(n, *shape), torch.randn(n, *shape)
        timesteps = model.set_timesteps(steps, shape)
        sigmas = model.scheduler.sigmas.tolist()
        emb, mask = model.encode_prompts(["a prompt"] * n)
        nemb, nmask = model.encode_prompts([""] * n)
        if frozen is not None:
            frozen.away()
        step_args = (0, timesteps, sigmas, 0.7, emb, mask, nemb, nmask, guidance)
        with autocast:
            ref_mean = ref.forward(flow_grpo.transition, model, x, x_next, *step_args)[1]
            logp, mean, std = flow_grpo.transition(model, x, x_next, *step_args)
        kl = ((mean - ref_mean) ** 2).flatten(1).mean(1) / (2 * std ** 2)
        return (-torch.exp(logp - logp.detach()) + 0.04 * kl).mean()

    return {"sample": sample, "vader": vader, "dpo": dpo, "rwr": rwr, "grpo": grpo, "grpo_sample": grpo_sample}[kind]


def plan_row(model_name, script, phase, F, H, W, lora_rank=16, ranks=1, fsdp=False, k=1, decode="all", steps=2,
             checkpointing=True, dtype=torch.bfloat16, cache=None, reward=None, offload=False, decoder_grad="prefix",
             cp=1, group=4, window=30):
    """Build (fake or real, per the ambient mode), run one phase, return the row. cp > 1: the scripts' --cp,
    diffusers' Ulysses attention on a (ranks / cp, 1, cp) mesh of the fake process group; its all-to-alls and
    the output's all-gather run as the fake group's collectives, which allocate their outputs as real ones do."""
    import distributed
    cache = {} if cache is None else cache
    if reward is None:
        reward = REWARD_OF[script]
    if ("reward", reward) not in cache:
        cache[("reward", reward)] = build_reward(reward, dtype) if reward != "tiny" else tiny_reward()
    rnet, rfn = cache[("reward", reward)]
    with no_adapter_move():
        model = build_model(model_name, dtype)
        # the DPO / RWR scripts' --grad-checkpointing (per block); VADER checkpoints inside common.sample
        blocks = checkpointing and phase != "sample" and script != "vader_grad" and \
            model.denoiser._supports_gradient_checkpointing
        params = common.setup_trainable(model, lora_rank, grad_checkpointing=blocks)
    if cp > 1:  # (as models.load_model(..., context_mesh=d.mesh) does; the mesh is host-side bookkeeping)
        from torch.distributed.device_mesh import init_device_mesh
        mesh = on_host(init_device_mesh)("cpu", (ranks // cp, 1, cp), mesh_dim_names=("data", "ring", "ulysses"))
        on_host(model.enable_context_parallel)(mesh)
    if fsdp:  # (the device mesh is host-side bookkeeping too: built from real tensors)
        import torch.distributed.fsdp._fully_shard._fully_shard as fs
        mesh = fs._init_default_mesh
        with mock_attr(fs, "_init_default_mesh", lambda *a: on_host(mesh)(*a)):
            params = distributed.shard(model, "bf16" if dtype == torch.bfloat16 else "fp16")
    autocast = torch.autocast("cpu", dtype=dtype)
    kind = {"sample": "sample"}.get(phase) or {"vader_grad": "vader", "vlm_feedback_rwr": "rwr"}.get(script, "dpo")
    if script == "flow_grpo":
        kind = "grpo_sample" if phase == "sample" else "grpo"
    offloaded = None
    if offload:  # the scripts' distributed.Offload; its host copies are host memory, which the plan does not count
        offloaded = distributed.Offload(distributed.modules_of([model.text_encoder, model.vae, rnet]))
        offloaded.host, sizes = [None] * len(offloaded.storages), [s.nbytes() for s in offloaded.storages]
    fn = phase_fns(model, rfn, F, H, W, autocast, kind, k, decode, steps, checkpointing, frozen=offloaded,
                   decoder_grad=decoder_grad)
    opt, held_tensors = None, []  # tensors held through the phase beside the models: rollouts, the DPO reference
    if script == "flow_grpo":  # the rollout of this rank's group (G videos, one prompt per rank) stays on the GPU:
        shape = model.latent_shape(F, H, W)  # x_i and x_{i+1} (fp32) of each of the `window` SDE steps of every video
        held = group * window - (steps if phase == "sample" else 0)  # (sampling: fn keeps its own `steps` ones)
        held_tensors = [torch.empty(held, *shape), torch.empty(held, *shape)]  # (+ log-probs: bytes)
        if phase == "sample":
            fn = (lambda f=fn: f(list(range(steps))))
    if phase == "update":
        opt = torch.optim.AdamW(params, lr=1e-4)
        if kind in ("dpo", "grpo"):
            ref = common.Reference(params, modules=model.experts)
            held_tensors = held_tensors + ref.weights
            run = (lambda: fn(ref))
        else:
            run = fn
    else:
        run = fn
    parts = [model.denoiser, model.text_encoder, model.vae, rnet]
    t0 = time.time()
    with mock_attr(type(model), "set_timesteps", timestep_list(type(model).set_timesteps)):
        peak, cats, after = measure(run, parts, opt, held_tensors, fsdp_root=model.denoiser if fsdp else None)
    for s, n in zip(offloaded.storages if offload else [], sizes if offload else []):  # (the reward is reused by
        s.resize_(n)  # the next rows: its weights back, as Offload.back() does in the scripts)
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    trainable = sum((q.to_local() if fsdp else q).numel() for q in params) * 4  # fp32; under FSDP this rank's shard
    resident = [model.denoiser] if offload else parts  # the weights on the GPU through the update
    frozen = nbytes([q for m in resident for q in m.parameters() if not q.requires_grad])
    expected = {"weights": frozen + trainable + (phase == "update" and kind in ("dpo", "grpo") and trainable),
                "grads": trainable if phase == "update" else 0, "optimizer": 2 * trainable if phase == "update" else 0}
    return {"script": script, "model": model_name, "frames": F, "height": H, "width": W, "lora_rank": lora_rank,
            "ranks": ranks, "fsdp": fsdp, "phase": phase, "flags": flags_of(script, ranks, fsdp, lora_rank, k, decode,
                                                                            checkpointing, offload, decoder_grad, cp,
                                                                            group, window),
            "peak_gib": peak / GiB, "categories_gib": {c: v / GiB for c, v in cats.items()},
            "after_step_gib": {c: v / GiB for c, v in after.items()},
            "expected_gib": {c: v / GiB for c, v in expected.items()}, "seconds": time.time() - t0}


def flags_of(script, ranks, fsdp, lora_rank, k=1, decode="all", checkpointing=True, offload=False,
             decoder_grad="prefix", cp=1, group=4, window=30):
    # DPO: one pair per rank per step; RWR: one video per rank
    f = f"--mixed-precision bf16 --lora-rank {lora_rank} --batch-size {ranks} --sample-batch-size 1 --grad-checkpointing"
    if script == "vader_grad":
        f = f"--mixed-precision bf16 --lora-rank {lora_rank} --sample-batch-size 1 --backprop-steps {k} " \
            f"--decode-frames {decode}" + ("" if checkpointing else " --no-grad-checkpointing") + \
            (" --decoder-grad own" if decoder_grad == "own" else "")
    if script == "flow_grpo":  # (30 sampler steps, all of them SDE steps: the defaults on real models)
        f += f" --group-size {group}" + (f" --sde-window 0:{window}" if window != 30 else "")
    if script != "vader_grad" and cp > 1:  # a context group holds one pair / video: the batch counts data ranks
        f = f.replace(f"--batch-size {ranks}", f"--batch-size {ranks // cp}")
    return f + (" --offload-frozen" if offload else "") + (" --fsdp" if fsdp else "") + \
        (f" --cp {cp}" if cp > 1 else "") + (f" (torchrun x{ranks})" if ranks > 1 else "")


def tiny_reward():
    net = torch.nn.Linear(3, 1)
    net.requires_grad_(False)
    return net, (lambda v: net(v.mean((1, 3, 4)).to(net.weight.dtype)).float()[:, 0])


# ----------------------------------------------------------------------------------------------
# Validations
# ----------------------------------------------------------------------------------------------
def validate_tiny():
    """(a) The same rows on the tiny Wan: fake tensors vs real CPU tensors (tracked real allocations)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    out = []
    for script, phase, extra in [("online_vpo", "update", {}), ("vader_grad", "update", {}), ("online_vpo", "sample", {}),
                                 ("vlm_feedback_rwr", "update", {}), ("online_vpo", "update", {"offload": True}),
                                 ("vader_grad", "update", {"decode": "one", "decoder_grad": "own"}),
                                 ("flow_grpo", "sample", {"window": 3}), ("flow_grpo", "update", {"window": 3})]:
        torch.manual_seed(0)
        real = plan_row("tiny-wan", script, phase, 9, 64, 64, lora_rank=4, reward="tiny", **extra)
        with FakeTensorMode(allow_non_fake_inputs=True):
            fake = plan_row("tiny-wan", script, phase, 9, 64, 64, lora_rank=4, reward="tiny", **extra)
        out.append({"check": f"tiny Wan {script} {phase}" + "".join(f" {k}={v}" for k, v in extra.items()) + ": fake / real", "estimate_gib": fake["peak_gib"],
                    "reference_gib": real["peak_gib"], "ratio": fake["peak_gib"] / real["peak_gib"]})
    return out


VADER_LADDER = [  # VADER (ModelScope, 384x384x16, 25 DPM steps, fp16, LoRA 16): name, K, decoded frames, ckpt, GB
    ("LoRA + mixed precision", 25, "all", False, 276.0),
    ("+ frame subsampling", 25, "one", False, 229.0),
    ("+ truncated backprop (K=1)", 1, "one", False, 69.0),
    ("+ gradient checkpointing", 1, "one", True, 32.5),
]


def validate_vader(cache):
    """(b) VADER's published ModelScope ladder at their settings."""
    out = []
    for name, k, decode, ckpt, published in VADER_LADDER:
        row = plan_row("modelscope-1.7b", "vader_grad", "update", 16, 384, 384, lora_rank=16, k=k if k < 25 else 99,
                       decode=decode, steps=25, checkpointing=ckpt, dtype=torch.float16, cache=cache)
        out.append({"check": f"VADER ladder: {name}", "estimate_gib": row["peak_gib"], "reference_gib": published * 1e9 / GiB,
                    "ratio": row["peak_gib"] / (published * 1e9 / GiB)})
        print(f"  {out[-1]['check']}: {row['peak_gib']:.1f} GiB vs published {published} GB", flush=True)
    return out


# ----------------------------------------------------------------------------------------------
def plan_configs(args):
    ranks = {int(r) for r in args.ranks.split(",")}
    return (c for c in _plan_configs(args) if c["ranks"] in ranks)


def _plan_configs(args):
    for model in args.models.split(","):
        for size in args.sizes.split(",") + args.vader_sizes.split(","):
            H, W, F = (int(v) for v in size.split("x"))
            if model == "wan2.2-5b" and H % 32:  # its 16x VAE and 2x2 patches: 720p is 704x1280 there
                H = H // 32 * 32
            for script in args.scripts.split(","):
                if size not in args.sizes.split(",") and script != "vader_grad":
                    continue
                phases = ["update"] if script == "vader_grad" else ["sample", "update"]
                for phase in phases:
                    for ranks, fsdp in ((1, False), (8, True)):
                        yield dict(model_name=model, script=script, phase=phase, F=F, H=H, W=W, ranks=ranks, fsdp=fsdp,
                                   lora_rank=args.lora_rank)
                if script == "online_vpo":  # --offload-frozen: text encoder, VAE and reward off the GPU in the update
                    for ranks, fsdp in ((1, False), (8, True)):
                        yield dict(model_name=model, script=script, phase="update", F=F, H=H, W=W, ranks=ranks,
                                   fsdp=fsdp, lora_rank=args.lora_rank, offload=True)
                if script == "online_vpo" and model.startswith("wan2.1") and H == 480:  # full fine-tune (DPO)
                    for ranks, fsdp in ((1, False), (8, True)):
                        for offload in (False, True):
                            yield dict(model_name=model, script=script, phase="update", F=F, H=H, W=W, ranks=ranks,
                                       fsdp=fsdp, lora_rank=0, offload=offload)
                if script == "flow_grpo" and F == 81:  # Flow-GRPO's own group size: the rollout it keeps is 6x
                    for phase in phases:
                        for ranks, fsdp in ((1, False), (8, True)):
                            yield dict(model_name=model, script=script, phase=phase, F=F, H=H, W=W, ranks=ranks,
                                       fsdp=fsdp, lora_rank=args.lora_rank, group=24)
                if model.startswith("wan2.1") and F == 81:  # --cp: Ulysses over the heads (1.3B: 12, 14B: 40)
                    cp = 4 if model == "wan2.1-1.3b" else 8
                    for phase in phases:
                        for offload in (False, True) if phase == "update" and script == "online_vpo" else (False,):
                            yield dict(model_name=model, script=script, phase=phase, F=F, H=H, W=W, ranks=8, fsdp=True,
                                       lora_rank=args.lora_rank, offload=offload, cp=cp)
                    if script == "vader_grad":
                        yield dict(model_name=model, script=script, phase="update", F=F, H=H, W=W, ranks=8, fsdp=True,
                                   lora_rank=args.lora_rank, decode="one", decoder_grad="own", cp=cp)
                if script == "vader_grad":  # the ladder's cheapest rung: one decoded frame (Wan: and its own latent
                    for ranks, fsdp in ((1, False), (8, True)):  # frame only carrying the decoder's gradient)
                        for dg in ("prefix", "own") if model.startswith("wan") else ("prefix",):
                            yield dict(model_name=model, script=script, phase="update", F=F, H=H, W=W, ranks=ranks,
                                       fsdp=fsdp, lora_rank=args.lora_rank, decode="one", decoder_grad=dg)


def key(row):
    return json.dumps([row[k] for k in ("script", "model", "frames", "height", "width", "lora_rank", "ranks", "fsdp",
                                        "phase", "flags")])


def derived_rows(rows):
    """Rows that equal measured ones by construction, marked so: gran_dpo samples, scores (VideoScore, its patch
    scores on crops no larger than the frame) and updates (one DPO pair per rank) as online_vpo does; without
    --fsdp every rank holds what one process holds (replicated weights, one pair or video per rank, gradients
    averaged in place)."""
    out = []
    for r in rows:
        if r["script"] == "online_vpo":
            out.append(dict(r, script="gran_dpo", derived_from="online_vpo (same reward and DPO update)"))
    for r in rows + out:
        if r["ranks"] == 1:
            out.append(dict(r, ranks=8, flags=r["flags"] + " (torchrun x8)",
                            derived_from=r.get("derived_from", "") + " replicated: = the 1-rank row"))
    return out


# what the table tries, in order, when a size does not fit with the defaults (--cp: 8 GPUs only)
VARIANTS = ("", "--decode-frames one", "--decode-frames one --decoder-grad own", "--offload-frozen", "--cp 4", "--cp 8",
            "--offload-frozen --cp 4", "--offload-frozen --cp 8", "--decode-frames one --decoder-grad own --cp 4",
            "--decode-frames one --decoder-grad own --cp 8")


def cp_flag(row):
    cp = re.search(r"--cp \d+", row["flags"])
    return [cp.group(0)] if cp else []


def variant(row):
    return " ".join([f for f in ("--decode-frames one", "--decoder-grad own", "--offload-frozen") if f in row["flags"]]
                    + cp_flag(row))


def fallbacks(v):
    """A phase planned without the variant's flag runs as with the nearest planned one: --offload-frozen acts in the
    update only (the sample phase of an --offload-frozen --cp 8 run is its --cp 8 row), else the default."""
    return [v, " ".join(v.replace("--offload-frozen", "").split()), ""]


def fits_table(rows, gib):
    """Per script and model: the largest video whose every phase fits, on 1 GPU and on 8 (FSDP), and the flag
    that makes it fit where the defaults do not (VADER: one decoded frame; DPO: --offload-frozen)."""
    lines = [f"| script | model | 1 x {gib:.0f} GB: largest video (peak GiB) | 8 x {gib:.0f} GB, --fsdp: largest video "
             f"(peak GiB per rank) |", "|---|---|---|---|"]
    combos = sorted({(r["script"], r["model"]) for r in rows})
    for script, model in combos:
        cells = []
        for ranks in (1, 8):
            best = None
            sizes = sorted({(r["frames"] * r["height"] * r["width"], r["height"], r["width"], r["frames"]) for r in rows
                            if r["script"] == script and r["model"] == model and r["ranks"] == ranks
                            and r["fsdp"] == (ranks > 1)})
            for _, H, W, F in sizes:
                sel = [r for r in rows if (r["script"], r["model"], r["ranks"], r["height"], r["width"], r["frames"]) ==
                       (script, model, ranks, H, W, F) and r["fsdp"] == (ranks > 1) and r["lora_rank"] > 0
                       and "--group-size 24" not in r["flags"]]  # (GRPO: its default group of 4)
                for v in VARIANTS:  # each phase with the variant's flag where it was planned, else as by default
                    phases = {r["phase"] for r in sel}
                    rs = [next((r for f in fallbacks(v) for r in sel if r["phase"] == ph and variant(r) == f), None)
                          for ph in phases]
                    if rs and None not in rs and any(variant(r) == v for r in rs) and \
                            max(r["peak_gib"] for r in rs) <= gib * 1e9 / GiB:
                        best = (H, W, F, max(r["peak_gib"] for r in rs), v)
                        break
            cells.append("does not fit" if best is None else
                         f"{best[0]}x{best[1]}x{best[2]} ({best[3]:.1f})" + (f" {best[4]}" if best[4] else ""))
        lines.append(f"| {script} | {model} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def extra_flags(row):
    return " ".join([f for f in ("--decoder-grad own", "--offload-frozen", "--group-size 24") if f in row["flags"]]
                    + cp_flag(row))


def detail_table(rows, models=("wan2.1-1.3b", "wan2.1-14b")):
    """Peak GiB per rank of every measured phase: 1 GPU | 8 GPUs with --fsdp."""
    sizes = sorted({(r["height"], r["width"], r["frames"]) for r in rows}, key=lambda s: s[0] * s[1] * s[2])
    head = " | ".join(f"{h}x{w}x{f}" for h, w, f in sizes)
    lines = [f"| model | script | phase | {head} |", "|---|---|---|" + "---|" * len(sizes)]
    order = ["online_vpo", "vlm_feedback_rwr", "vader_grad", "flow_grpo"]
    for model in models:
        kinds = sorted({(r["script"], r["phase"], r["lora_rank"], r["flags"].split(" --decode-frames ")[-1].split()[0]
                         if "--decode-frames" in r["flags"] else "", extra_flags(r)) for r in rows
                        if r["model"] == model and "derived_from" not in r},
                       key=lambda k: (order.index(k[0]) if k[0] in order else 9, k[1], -k[2], k[3], k[4]))
        for script, phase, lora, decode, extra in kinds:
            cells = []
            for h, w, f in sizes:
                got = {}
                for r in rows:
                    if (r["model"], r["script"], r["phase"], r["lora_rank"], r["height"], r["width"], r["frames"]) == \
                            (model, script, phase, lora, h, w, f) and "derived_from" not in r and \
                            (not decode or f"--decode-frames {decode}" in r["flags"]) and \
                            extra == extra_flags(r):
                        got[r["fsdp"]] = r["peak_gib"]
                cells.append(" / ".join(f"{got[k]:.1f}" for k in (False, True) if k in got) or "-")
            name = phase + ("" if lora else ", full fine-tune") + (f", {decode} frame(s) decoded" if decode else "") + \
                (f", {extra}" if extra else "")
            lines.append(f"| {model} | {script} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def refuse_to_overwrite_shipped(args):
    """An --out among the shipped results: never for --smoke, and an existing file only with --overwrite."""
    real = os.path.realpath(args.out)
    if not any(real.startswith(os.path.realpath(d) + os.sep) for d in SHIPPED):
        return
    if args.smoke:
        raise SystemExit(f"memory_plan: --smoke makes plumbing rows, not a plan: give it an --out outside the shipped "
                         f"benchmarks/results/ (the default, runs/memory_plan.json), so {args.out} keeps the plan")
    if os.path.exists(real) and not args.overwrite:
        raise SystemExit(f"memory_plan: {args.out} is shipped (committed) and this run would rewrite it: write under "
                         f"runs/ (the default --out, runs/memory_plan.json), or pass --overwrite to extend (or with "
                         f"--fresh recompute) the shipped plan")


def main(args):
    if args.report:
        path = args.out
        if not os.path.exists(path) and path == p.get_default("out"):
            path = SHIPPED_PLAN  # nothing planned here yet: the shipped plan's tables
        print(f"(from {os.path.relpath(path)})")
        with open(path) as f:
            result = json.load(f)
        rows = result["rows"] + derived_rows(result["rows"])
        print(fits_table(rows, args.gpu_gib) + "\n\n" + detail_table(result["rows"]))
        for v in result["validations"]:
            print(f"{v['check']}: estimate {v['estimate_gib']:.3f} GiB, reference {v['reference_gib']:.3f} GiB, "
                  f"ratio {v['ratio']:.2f}")
        return result
    refuse_to_overwrite_shipped(args)
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore
    import torch.distributed as dist
    torch.set_num_threads(1)
    result = {"command": "python " + " ".join(sys.argv), "rows": [], "validations": []}
    if os.path.exists(args.out) and not args.fresh and not args.smoke:
        with open(args.out) as f:
            result = json.load(f) | {"command": result["command"]}
    done = {key(r) for r in result["rows"]}
    if args.smoke:
        result["validations"] = validate_tiny()
        for v in result["validations"]:
            print(f"{v['check']}: {v['estimate_gib'] * 1024:.2f} MiB vs {v['reference_gib'] * 1024:.2f} MiB, "
                  f"ratio {v['ratio']:.3f}")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=8)  # 8 ranks simulated in one process
    if args.smoke:  # the tiny Wan's DPO update on one rank, sharded over 8, offloaded, and with --cp 2
        with FakeTensorMode(allow_non_fake_inputs=True):
            for ranks, fsdp, offload, cp in ((1, False, False, 1), (8, True, False, 1), (1, False, True, 1),
                                             (8, True, False, 2)):
                row = plan_row("tiny-wan", "online_vpo", "update", 9, 64, 64, lora_rank=4, ranks=ranks, fsdp=fsdp,
                               reward="tiny", offload=offload, cp=cp)
                result["rows"].append(row)
                print(json.dumps({k: row[k] for k in ("ranks", "fsdp", "peak_gib", "after_step_gib", "expected_gib")}))
        save(args.out, result)
        return result
    cache = {}
    with FakeTensorMode(allow_non_fake_inputs=True):
        for cfg in plan_configs(args):
            flags = flags_of(cfg["script"], cfg["ranks"], cfg["fsdp"], cfg["lora_rank"], decode=cfg.get("decode", "all"),
                             offload=cfg.get("offload", False), decoder_grad=cfg.get("decoder_grad", "prefix"),
                             cp=cfg.get("cp", 1), group=cfg.get("group", 4), window=cfg.get("window", 30))
            probe = {"script": cfg["script"], "model": cfg["model_name"], "frames": cfg["F"], "height": cfg["H"],
                     "width": cfg["W"], "lora_rank": cfg["lora_rank"], "ranks": cfg["ranks"], "fsdp": cfg["fsdp"],
                     "phase": cfg["phase"], "flags": flags}
            if key(probe) in done:
                continue
            row = plan_row(**cfg, cache=cache)
            result["rows"].append(row)
            done.add(key(row))
            print(f"{row['script']:17s} {row['model']:16s} {row['height']}x{row['width']}x{row['frames']:<3d} "
                  f"ranks {row['ranks']} fsdp {row['fsdp']!s:5s} {row['phase']:6s} {row['peak_gib']:7.1f} GiB "
                  f"({row['seconds']:.0f} s)", flush=True)
            save(args.out, result)
        if not args.skip_validation and not result["validations"]:
            result["validations"] = validate_vader(cache)
            save(args.out, result)
    if not args.skip_validation and not any(v["check"].startswith("tiny") for v in result["validations"]):
        result["validations"] += validate_tiny()
        save(args.out, result)
    rows = result["rows"] + derived_rows(result["rows"])
    result["derived_rows"] = derived_rows(result["rows"])
    save(args.out, result)
    print("\n" + fits_table(rows, args.gpu_gib))
    for v in result["validations"]:
        print(f"{v['check']}: estimate {v['estimate_gib']:.3f} GiB, reference {v['reference_gib']:.3f} GiB, "
              f"ratio {v['ratio']:.2f}")
    return result


def save(path, result):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main(p.parse_args())
