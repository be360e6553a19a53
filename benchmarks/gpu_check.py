"""GPU check: validate the regime users run (bf16 on CUDA, the NCCL/gloo process group, real Wan sizes, speed)
in one command of at most ~8 minutes on one H100/H200-class GPU, ready before a GPU is lent.

No weights can be downloaded, so the REAL architectures are built with random weights directly on the device
(meta-device init, `to_empty`, a fan-in normal init, bf16 with each model's fp32 islands as from_pretrained keeps
them). Steps, in order, each guarded (a failure is recorded with its traceback and the next step still runs):
  1 scripts   every script's real `main` for 2 steps on a tiny random Wan in bf16 on the device, inside the
              torchrun-style process group (world size 1): DPO inside term != 0 after step 1 and loss != log 2,
              VADER's LoRA gradient != 0, RWR trains a round
  2 sampler   Wan 2.1 1.3B: our sampler vs the stock WanPipeline on the same components: latents equal at the
              same seeds (fp32), videos/s in bf16
  3 update    Wan 2.1 1.3B at 480x832x81: one DPO and one VADER update (one decoded frame, --decoder-grad own):
              wall time, peak memory vs benchmarks/memory_plan.py's prediction for the same configuration, MFU
  4 extras    if time is left: the same updates at 720x1280x81; torch.compile of the denoiser blocks and diffusers'
              attention backends against eager, as speed ratios
Writes benchmarks/results/gpu_check.json after every step and prints a table at the end.

    python benchmarks/gpu_check.py                 # on the GPU machine (~6-8 min)
    python benchmarks/gpu_check.py --smoke         # the same code on CPU, tiny configs (CI; runs/gpu_check-smoke.json)
    python benchmarks/gpu_check.py --smoke --device cuda   # tiny configs on the GPU: a pre-flight in seconds
"""
import argparse
import datetime
import gc
import math
import multiprocessing
import os
import platform
import socket
import sys
import tempfile
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE, os.path.join(ROOT, "tests")]
import common  # noqa: E402
import memory_plan  # noqa: E402
import models
import distributed

p = argparse.ArgumentParser(description="validate the real regime on one GPU in minutes")
p.add_argument("--smoke", action="store_true", help="same code on CPU with tiny configs, in seconds (CI)")
p.add_argument("--budget-s", type=float, default=420.0, help="start no new step once this many seconds are spent")
p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available; cpu with --smoke, where "
               "--smoke --device cuda is a seconds-long pre-flight of every CUDA code path)")
p.add_argument("--only", default=None, help="comma-separated step keys to run, e.g. 2_sampler,3_update (default: all)")
p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gpu_check.json; with --smoke runs/gpu_check-smoke.json)")

LORA_RANK = 16  # the scripts' default, and the memory plan's rows
BF16_PEAK = [("H100 PCIE", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
             ("A100", 312e12), ("L40S", 362e12), ("B200", 2250e12)]  # dense bf16 FLOP/s by device name, first match
LOG2 = math.log(2)


def config(smoke, cuda):
    """Sizes are (frames, height, width). The smoke config is memory_plan's tiny Wan, which it validates."""
    speed = dict(compile_backend="inductor", backends=["_native_flash", "_native_cudnn", "_native_efficient", "flash",
                                                       "_flash_3"]) if cuda else \
        dict(compile_backend="aot_eager", backends=["_native_math", "_native_flash"])  # (inductor on CPU: minutes)
    if smoke:
        return dict(spec="tiny-wan", max_len=16, sampler=(9, 32, 32), videos=2, id_steps=2, time_steps=3,
                    update=(9, 64, 64), big=(9, 64, 96), **speed)
    return dict(spec="wan2.1-1.3b", max_len=512, sampler=(33, 480, 832), videos=1, id_steps=2, time_steps=10,
                update=(81, 480, 832), big=(81, 720, 1280), **speed)


def check(ok, msg):
    if not ok:  # (not `assert`: python -O must not skip the checks)
        raise AssertionError(msg)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bf16_peak(name):
    return next((v for k, v in BF16_PEAK if k in name.upper()), None)


# ----------------------------------------------------------------------------------------------
# Real architectures with random weights, built on the device
# ----------------------------------------------------------------------------------------------
def fp32_islands(module, dtype):
    """The submodule names from_pretrained keeps in fp32 at `dtype`: diffusers' _keep_in_fp32_modules always,
    transformers' only at fp16 (its _strict list also at bf16)."""
    if module.__class__.__module__.startswith("transformers"):
        strict = set(getattr(module, "_keep_in_fp32_modules_strict", None) or [])
        return strict | (set(module._keep_in_fp32_modules or []) if dtype == torch.float16 else set())
    return set(getattr(module, "_keep_in_fp32_modules", None) or [])


def cast(module, dtype):
    """Cast floating weights and buffers to `dtype`, fp32 islands kept (diffusers' name rule: a path component)."""
    keep = fp32_islands(module, dtype)
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.is_floating_point():
            t.data = t.data.to(torch.float32 if keep & set(name.split(".")) else dtype)
    return module


def materialize(make, device, dtype, seed=0):
    """make() on the meta device (no host copy of the weights), then to_empty on `device` and a fast random
    init: fan-in scaled normal for matrices and kernels (keeps activations O(1) through 30-40 blocks, so bf16
    neither overflows nor saturates the VAE's clamp), zero biases, unit norm scales."""
    with torch.device("meta"):
        m = cast(make(), dtype)
    owners = {}  # to_empty gives each module its own new tensor: tied weights (UMT5's embeddings) would untie
    for sub in m.modules():
        for key, t in sub._parameters.items():
            owners.setdefault(id(t), []).append((sub, key))
    m.to_empty(device=device)
    for (first, key), *others in owners.values():
        for sub, k in others:
            sub._parameters[k] = first._parameters[key]
    g = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, t in m.named_parameters():
            if name.endswith("bias"):
                t.zero_()
            elif t.dim() == 1 or name.endswith("gamma"):
                t.fill_(1.0)
            else:
                t.normal_(0.0, t[0].numel() ** -0.5, generator=g)
    for name, sub in list(m.named_modules()):  # buffers are computed by __init__: rebuild their owners
        if list(sub.buffers(recurse=False)):
            check(type(sub).__name__ == "WanRotaryPosEmbed", f"no recipe for the buffers of {type(sub).__name__}")
            with torch.device(device):
                new = type(sub)(sub.attention_head_dim, sub.patch_size, sub.max_seq_len)
            parent = m.get_submodule(name.rsplit(".", 1)[0]) if "." in name else m
            setattr(parent, name.rsplit(".", 1)[-1], new)
    return m


def build_model(spec, device, dtype, tokenizer=None, scheduler=None):
    """A models.VideoModel of memory_plan.MODELS[spec] (the plan's own architecture entry, so the prediction is
    for the same model); tokenizer: the plan's FakeTokenizer (full-length prompts) unless given."""
    import diffusers
    import transformers
    family, den_cls, den_cfg, vae_cls, vae_cfg, (text_kind, text_cfg), max_len, (sch_cls, sch_cfg) = memory_plan.MODELS[spec]
    check(family == "wan" and text_kind == "UMT5", f"{spec}: the check builds Wan models only")
    den = materialize(lambda: getattr(diffusers, den_cls)(**den_cfg), device, dtype, 1)
    vae = materialize(lambda: getattr(diffusers, vae_cls)(**vae_cfg), device, dtype, 2).eval().requires_grad_(False)
    text = materialize(lambda: transformers.UMT5EncoderModel(transformers.UMT5Config(**text_cfg, dropout_rate=0.0)),
                       device, dtype, 3).eval().requires_grad_(False)
    scheduler = scheduler or getattr(diffusers, sch_cls)(**sch_cfg)
    return models.FAMILIES[family](spec, "flow", tokenizer or memory_plan.FakeTokenizer(max_len), text, den, vae,
                                   scheduler, max_len)


def release():
    """Free the device between steps, so each step's peak is its own."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ----------------------------------------------------------------------------------------------
# Step 1: every script's real main, tiny Wan, bf16, in the process group a torchrun run gets
# ----------------------------------------------------------------------------------------------
DPO_ARGS = ["--steps", "2", "--batch-size", "2", "--num-candidates", "2", "--num-eval-prompts", "2", "--min-margin", "0",
            "--eval-every", "99", "--lr", "1e-2", "--ref-update-interval", "0"]
SCRIPT_ARGS = {  # per script: its arguments (the tiny model, size, bf16, LoRA and --out are added for all)
    "online_vpo": DPO_ARGS + ["--reward", "toy:temporal"],
    "gran_dpo": DPO_ARGS + ["--reward", "toy:quality", "--patch-grid", "1,2,2", "--offload-frozen"],
    "vader_grad": ["--steps", "2", "--batch-size", "2", "--num-eval-prompts", "2", "--diversity-prompts", "2",
                   "--diversity-seeds", "2", "--eval-every", "99", "--decode-frames", "alternate", "--decoder-grad", "own"],
    "vlm_feedback_rwr": ["--rounds", "1", "--prompts-per-round", "4", "--videos-per-prompt", "2", "--batch-size", "4",
                         "--epochs", "1", "--eval-seeds", "1", "--num-train-eval-prompts", "2", "--judge", "judge:p_yes"],
    "flow_grpo": ["--steps", "2", "--batch-size", "2", "--group-size", "2", "--num-eval-prompts", "2", "--eval-every",
                  "99", "--lr", "1e-2", "--reward", "toy:temporal", "--ema"],
}
NOT_ALIGNMENT = {"pretrain_toy"}  # scripts with a main that are not alignment algorithms


def scripts():
    """The four scripts and any newer top-level script with a module-level parser `p` and `main(args)`."""
    found = []
    for f in sorted(os.listdir(ROOT)):
        if f.endswith(".py") and f[:-3] not in NOT_ALIGNMENT:
            with open(os.path.join(ROOT, f)) as fh:
                src = fh.read()
            if "\ndef main(args)" in src and "\np = argparse.ArgumentParser" in src:
                found.append(f[:-3])
    return found


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_scripts(rec, ctx):
    import importlib
    import json

    import tiny_models
    dist = torch.distributed
    cuda = ctx.dev.type == "cuda"
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": str(ctx.dev.index or 0)}
    saved_env = {k: os.environ.get(k) for k in env}
    saved = {"setup_trainable": common.setup_trainable, "average_gradients": distributed.average_gradients}
    seen, rec["scripts"], failed = {}, {}, []
    created = not dist.is_initialized()
    tmp = tempfile.TemporaryDirectory(prefix="gpu_check_")
    try:
        os.environ.update(env)
        if cuda:
            torch.cuda.set_device(ctx.dev)
        # setup_distributed joins a group only when WORLD_SIZE > 1: join the one a multi-GPU torchrun run gets here,
        # so both halves (gloo for CPU tensors, nccl for CUDA ones) are exercised and the mains run inside it
        backend = distributed.process_group_backend(cuda)
        if created:
            dist.init_process_group(backend)
        tensors = [torch.ones(1)] + ([torch.ones(1, device=ctx.dev)] if cuda else [])
        for t in tensors:
            dist.all_reduce(t)
        rec["process_group"] = {"backend": backend, "world_size": dist.get_world_size(),
                                "all_reduce_ok": [t.device.type for t in tensors if t.item() == 1.0]}
        folder = os.path.join(tmp.name, "wan")
        tiny_models.build("wan", folder)
        F, H, W = tiny_models.SIZES["wan"]
        base = ["--model", folder, "--num-frames", str(F), "--height", str(H), "--width", str(W), "--mixed-precision",
                "bf16", "--lora-rank", "4", "--sample-steps", "2", "--device", str(ctx.dev)]
        # instrumentation: the model each main trains and the gradients of each update, before averaging
        common.setup_trainable = lambda model, *a, **k: seen.__setitem__("model", model) or saved["setup_trainable"](model, *a, **k)
        distributed.average_gradients = lambda params, d: seen["grads"].append(
            [q.grad.float().norm().item() if q.grad is not None else 0.0 for q in params]) or saved["average_gradients"](params, d)
        for name in scripts():
            r = rec["scripts"][name] = {}
            seen.clear()
            seen["grads"] = []
            try:
                mod = importlib.import_module(name)
                known = mod.p._option_string_actions
                extra = SCRIPT_ARGS.get(name, ["--steps", "2"])  # a newer script: the generic flags it accepts
                argv, keep = [], True
                for a in base + extra:  # a flag the parser does not know is dropped with its value
                    keep = a in known if a.startswith("--") else keep
                    argv += [a] if keep else []
                t0 = time.time()
                out = mod.main(mod.p.parse_args(argv + ["--out", os.path.join(tmp.name, name)]))
                r["seconds"] = round(time.time() - t0, 2)
                with open(os.path.join(out, "metrics.jsonl")) as fh:
                    rows = [json.loads(line) for line in fh]
                train = [x for x in rows if not x.get("eval")]
                check(train and all(math.isfinite(x.get("loss", 0.0)) for x in train), f"{name}: no finite training rows")
                r["device"] = str(next(seen["model"].denoiser.parameters()).device)
                check(r["device"].split(":")[0] == ctx.dev.type, f"{name} trained on {r['device']}")
                if "inside_mean" in train[0]:  # DPO: policy == reference at step 1, a real signal after it
                    r |= {"inside_step1": train[0]["inside_mean"], "inside_step2": train[1]["inside_mean"],
                          "loss_step2": train[1]["loss"]}
                    check(train[1]["inside_mean"] != 0.0 and abs(train[1]["loss"] - LOG2) > 1e-6,
                          f"{name}: no DPO signal after step 1 (inside {train[1]['inside_mean']}, loss {train[1]['loss']})")
                if name == "vader_grad":  # the reward gradient reaches the LoRA (lora_A's is 0 while B is at its 0 init)
                    names = [n for n, q in seen["model"].denoiser.named_parameters() if q.requires_grad]
                    lora_b = [g for n, g in zip(names, seen["grads"][0]) if "lora_B" in n]
                    r["lora_B_grad_min"] = min(lora_b) if lora_b else None
                    check(lora_b and min(lora_b) > 0 and all(map(math.isfinite, lora_b)), f"vader_grad: LoRA grads {lora_b}")
                if name == "vlm_feedback_rwr":
                    epochs = [x for x in train if "epoch" in x]
                    r["batches_trained"] = sum(x["batches"] for x in epochs)
                    check(epochs and r["batches_trained"] > 0, "vlm_feedback_rwr: the round trained no batch")
                r["ok"] = True
            except Exception as e:
                r |= {"ok": False, "error": f"{type(e).__name__}: {e}"[:500], "traceback": traceback.format_exc()[-2000:]}
                failed.append(name)
        rec["summary"] = ", ".join(f"{n} {'ok' if r['ok'] else 'FAILED'}" for n, r in rec["scripts"].items()) + \
            f"; process group {backend}"
        check(not failed, f"scripts failed: {failed}")
    finally:
        common.setup_trainable, distributed.average_gradients = saved["setup_trainable"], saved["average_gradients"]
        if created and dist.is_initialized():
            dist.destroy_process_group()
        for k, v in saved_env.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        tmp.cleanup()


# ----------------------------------------------------------------------------------------------
# Step 2: our sampler vs the stock WanPipeline on the same components
# ----------------------------------------------------------------------------------------------
def step_sampler(rec, ctx):
    import diffusers
    import tiny_models
    F, H, W = ctx.cfg["sampler"]
    n = ctx.cfg["videos"]
    prompts, seeds = ["a red ball bouncing", "a blue circle moving left"][:n], [11, 22][:n]
    # the scheduler the Wan 2.1 checkpoints ship; a word-level tokenizer (no vocabulary files offline)
    sched = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    tok = tiny_models.word_tokenizer(ctx.cfg["max_len"])
    model = build_model(ctx.cfg["spec"], ctx.dev, torch.float32, tok, diffusers.UniPCMultistepScheduler(**sched))
    pipe = diffusers.WanPipeline(tokenizer=tok, text_encoder=model.text_encoder, transformer=model.denoiser,
                                 vae=model.vae, scheduler=diffusers.UniPCMultistepScheduler(**sched))
    pipe.set_progress_bar_config(disable=True)
    rec["note"] = "random weights; the plan's text encoder (UMT5-XXL at full size) with a 36-word tokenizer"

    def stock(steps):
        last = {}
        video = pipe(prompt=prompts, negative_prompt=[""] * n, num_frames=F, height=H, width=W, num_inference_steps=steps,
                     guidance_scale=5.0, output_type="pt", max_sequence_length=ctx.cfg["max_len"],
                     generator=[torch.Generator().manual_seed(s) for s in seeds],
                     callback_on_step_end=lambda pp, i, t, kw: last.update(kw) or {}).frames
        return last["latents"], torch.as_tensor(video)

    def ours(steps, autocast=None):
        return common.sample(model, prompts, seeds, F, H, W, steps, 5.0, autocast=autocast)

    def compare(a, b):
        d, std = (a[0] - b[0]).abs(), a[0].std().item()
        return {"latents_max_abs": d.max().item(), "latents_rel": d.max().item() / std, "latents_mean_rel": d.mean().item() / std,
                "videos_max_abs": (a[1].float() - b[1].float()).abs().max().item()}

    with torch.no_grad():
        # 1. equality, in fp32 (bf16 rounds differently by design: the pipeline applies CFG in bf16, we in fp32)
        rec["fp32"] = compare(ours(ctx.cfg["id_steps"]), stock(ctx.cfg["id_steps"]))
        rel = rec["fp32"]["latents_rel"]
        check(rel < 1e-3, f"our sampler differs from WanPipeline in fp32: max |d latents| = {rel:.2e} x std")
        # 2. speed in bf16: ours under autocast as the scripts sample, the pipeline as users call it
        for m in (model.denoiser, model.text_encoder, model.vae):
            cast(m, torch.bfloat16)
        model.prompt_cache.clear()
        autocast = common.autocast_context("bf16", ctx.dev)
        ours(1, autocast), stock(1)  # warm-up: lazy kernel loading, cuDNN / cuBLAS handles
        timed = {}
        for name, fn in (("ours", lambda: ours(ctx.cfg["time_steps"], autocast)), ("stock", lambda: stock(ctx.cfg["time_steps"]))):
            sync(ctx.dev)
            t0 = time.time()
            timed[name] = fn()
            sync(ctx.dev)
            rec[f"{name}_videos_per_s"] = n / (time.time() - t0)
    rec["bf16"] = compare(timed["ours"], timed["stock"])
    rec |= {"size": f"{H}x{W}x{F}", "videos": n, "steps_timed": ctx.cfg["time_steps"],
            "speed_ratio_ours_over_stock": rec["ours_videos_per_s"] / rec["stock_videos_per_s"]}
    rec["summary"] = (f"fp32 max|dlat| {rel:.1e} x std, bf16 {rec['bf16']['latents_rel']:.1e} x std; "
                      f"videos/s ours {rec['ours_videos_per_s']:.3g} vs stock {rec['stock_videos_per_s']:.3g}")


# ----------------------------------------------------------------------------------------------
# Steps 3 and 4a: one DPO and one VADER update, against the memory plan
# ----------------------------------------------------------------------------------------------
PLAN_KW = {"dpo": ("online_vpo", {}), "vader": ("vader_grad", {"decode": "one", "decoder_grad": "own"})}


def plan_peak(spec, kind, size):
    """memory_plan.plan_row for exactly the update below, on fake tensors (run in a child process, in parallel)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    script, kw = PLAN_KW[kind]
    torch.manual_seed(0)
    with FakeTensorMode(allow_non_fake_inputs=True):
        row = memory_plan.plan_row(spec, script, "update", *size, lora_rank=LORA_RANK, reward="tiny", **kw)
    return {"peak_gib_plan": row["peak_gib"], "plan_flags": row["flags"], "plan_seconds": row["seconds"]}


def run_update(forward, params, optimizer, parts, ref_tensors, ctx):
    """Run 1 warms up (and creates AdamW's state); run 2 is timed, its peak taken by the CUDA allocator (on CPU by
    torch's MemTracker, which has no allocator peak there); run 3 counts FLOPs under PyTorch's FlopCounterMode,
    last and on its own: the first H200 check ran out of memory inside the counted run, and the plain update's
    peak must not be lost with it. All three clip and step AdamW, as the scripts do."""
    from torch.utils.flop_counter import FlopCounterMode
    out = {}

    def update():
        forward(out).backward()
        grad_norm = distributed.clip_grad_norm(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm

    forward(out).backward()
    # (the whole of lora_B's gradient, before clipping: with the plan's FakeTokenizer every text token is the
    # same, so the cross-attention keys get none, and lora_A gets none while B is at its zero init)
    out["lora_B_grad_norm"] = torch.stack([q.grad.float().norm() for n, q in parts[0].named_parameters()
                                           if "lora_B" in n and q.grad is not None]).norm().item()
    out["grad_norm"] = distributed.clip_grad_norm(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    release()
    sync(ctx.dev)
    t0 = time.time()
    if ctx.dev.type == "cuda":
        update()
        sync(ctx.dev)
        out["peak_gib"] = torch.cuda.max_memory_allocated(ctx.dev) / 2**30
    else:
        out["peak_gib"] = memory_plan.measure(lambda: forward(out), parts, optimizer, ref_tensors)[0] / 2**30
    out["seconds"] = time.time() - t0
    release()
    try:
        with FlopCounterMode(display=False) as counter:
            update()
        out["flops"] = counter.get_total_flops()
        out["tflops_per_s"] = out["flops"] / out["seconds"] / 1e12
        out["mfu"] = out["flops"] / out["seconds"] / ctx.peak_flops if ctx.peak_flops else None
    except torch.OutOfMemoryError as e:  # (recorded; the peak above stands)
        optimizer.zero_grad(set_to_none=True)
        out |= {"flops": None, "tflops_per_s": None, "mfu": None, "flop_count_error": f"OutOfMemoryError: {e}"[:300]}
        release()
    return out


def step_updates(rec, ctx, size):
    import online_vpo
    F, H, W = size
    bf16 = torch.bfloat16
    model = build_model(ctx.cfg["spec"], ctx.dev, bf16)  # frozen parts bf16, as --mixed-precision bf16 loads them
    rnet, reward = memory_plan.tiny_reward()  # the plan's stand-in reward (a real one adds its own weights)
    rnet.to(ctx.dev)
    parts = [model.denoiser, model.text_encoder, model.vae, rnet]
    # the DPO scripts' --grad-checkpointing (per block); VADER checkpoints inside common.sample (per call + per block)
    params = common.setup_trainable(model, LORA_RANK, grad_checkpointing=True)
    autocast = common.autocast_context("bf16", ctx.dev)
    shape = model.latent_shape(F, H, W)
    g = torch.Generator().manual_seed(0)
    rec |= {"size": f"{H}x{W}x{F}", "note": (
        "peak: the whole update, weights included, of the SECOND update (AdamW state resident, as at every step after "
        "the first) vs memory_plan.plan_row for the same model, size, flags and stand-in reward, which peaks in a first "
        "update before its AdamW state exists (2 x the fp32 LoRA: 0.09 GiB at Wan 1.3B r16) and builds Wan's fp32 "
        "islands in bf16 (6 MiB); FLOPs count gradient checkpointing's recompute (so MFU is nearer HFU)")}
    failed = []
    for kind in ("dpo", "vader"):
        # lr 1e-2: after the first update the policy visibly differs from the reference even through bf16 rounding
        optimizer = torch.optim.AdamW(params, lr=1e-2 if kind == "dpo" else 1e-4)
        ref = common.Reference(params, model.experts) if kind == "dpo" else None

        def dpo(out):  # online_vpo.py step 5, one pair: reference then policy, one (t, eps) shared by w and l
            x0 = torch.randn(2, *shape, generator=g).to(ctx.dev)
            t = common.sample_train_timesteps(model, 1, g).repeat(2).to(ctx.dev)
            eps = torch.randn(1, *shape, generator=g).repeat(2, 1, 1, 1, 1).to(ctx.dev)
            x_t, target = common.noisy_and_target(model, x0, eps, t)
            emb, mask = model.encode_prompts(["a prompt"] * 2)
            with autocast:
                ref_pred = ref.forward(model.denoise, x_t, t, emb, mask)
                pred = model.denoise(x_t, t, emb, mask)
            e_w, e_l = common.per_sample_mse(pred, target).chunk(2)
            r_w, r_l = common.per_sample_mse(ref_pred, target).chunk(2)
            losses, inside = online_vpo.dpo_loss(e_w, e_l, r_w, r_l, 100.0)
            out.setdefault("inside", []).append(inside.item())
            return losses.mean()

        def vader(out):  # vader_grad.py: 2 sampler steps, the last with gradient, one decoded frame, own latent only
            with autocast:
                _, video = common.sample(model, ["a prompt"], [0], F, H, W, 2, 5.0, grad_from=1, grad_checkpointing=True,
                                         decode_frames=[F // 2], decoder_prefix_grad=False)
                return -reward(video).mean()

        r = rec[kind] = {}
        try:
            r |= run_update(dpo if kind == "dpo" else vader, params, optimizer, parts, ref.weights if ref else (), ctx)
            check(r["lora_B_grad_norm"] > 0 and math.isfinite(r["grad_norm"]), f"{kind}: LoRA gradient {r['lora_B_grad_norm']}")
            if kind == "dpo":  # policy == reference in the first update; the second one has a real DPO signal
                check(r["inside"][1] != 0.0, f"DPO inside term {r['inside']}: the policy never left the reference")
            plan = ctx.plans.get((kind, size))
            check(plan is not None, "no memory-plan prediction was started for this size")
            r |= plan.get(timeout=max(ctx.time_left(), 120))  # (the plan is the point of this step: wait for it)
            r["ratio_measured_over_plan"] = r["peak_gib"] / r["peak_gib_plan"]
        except Exception as e:
            r |= {"error": f"{type(e).__name__}: {e}"[:500], "traceback": traceback.format_exc()[-2000:]}
            failed.append(kind)
        finally:
            del optimizer, ref
            release()
    rec["summary"] = "; ".join(
        f"{k} " + (f"{rec[k]['seconds']:.2f} s, peak {rec[k]['peak_gib']:.3g} GiB" if "seconds" in rec[k] else "FAILED") +
        (f" (plan x{rec[k]['ratio_measured_over_plan']:.2f})" if "ratio_measured_over_plan" in rec[k] else "") +
        (f", MFU {rec[k]['mfu']:.2f}" if rec[k].get("mfu") else "") for k in ("dpo", "vader"))
    check(not failed, f"updates failed: {failed}")


# ----------------------------------------------------------------------------------------------
# Step 4b: torch.compile of the blocks and diffusers' attention backends vs eager, on the DPO update
# ----------------------------------------------------------------------------------------------
def step_speed(rec, ctx):
    import online_vpo
    F, H, W = ctx.cfg["update"]
    model = build_model(ctx.cfg["spec"], ctx.dev, torch.bfloat16)
    params = common.setup_trainable(model, LORA_RANK, grad_checkpointing=True)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    autocast = common.autocast_context("bf16", ctx.dev)
    shape = model.latent_shape(F, H, W)
    x0 = torch.randn(2, *shape).to(ctx.dev)
    t = torch.full((2,), 500.0, device=ctx.dev)
    x_t, target = common.noisy_and_target(model, x0, torch.randn_like(x0), t)
    emb, mask = model.encode_prompts(["a prompt"] * 2)

    def update():  # the policy half of the DPO update (the reference forward runs no backward)
        with autocast:
            pred = model.denoise(x_t, t, emb, mask)
        e_w, e_l = common.per_sample_mse(pred, target).chunk(2)
        online_vpo.dpo_loss(e_w, e_l, e_w.detach(), e_l.detach(), 100.0)[0].mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def timed(runs=1):
        update()  # warm-up (and the compile)
        sync(ctx.dev)
        t0 = time.time()
        for _ in range(runs):
            update()
        sync(ctx.dev)
        return (time.time() - t0) / runs

    rec |= {"size": f"{H}x{W}x{F}", "eager_s": timed(), "speedup_over_eager": {}, "errors": {}}
    variants = [(f"attention {b}", b) for b in ctx.cfg["backends"]] + [(f"compile blocks ({ctx.cfg['compile_backend']})", None)]
    for name, backend in variants:
        if ctx.time_left() < 3 * rec["eager_s"] + (60 if backend is None else 0):
            rec["errors"][name] = "skipped: budget"
            continue
        try:
            if backend:
                model.denoiser.set_attention_backend(backend)
            else:
                model.denoiser.set_attention_backend("native")
                for block in model.denoiser.blocks:  # regional compilation: one graph, reused by every block
                    block.compile(backend=ctx.cfg["compile_backend"])
            rec["speedup_over_eager"][name] = rec["eager_s"] / timed()
        except Exception as e:
            rec["errors"][name] = f"{type(e).__name__}: {e}"[:300]
        finally:
            if backend:
                model.denoiser.set_attention_backend("native")
    rec["summary"] = f"eager {rec['eager_s']:.2f} s; " + ", ".join(f"{k} x{v:.2f}" for k, v in rec["speedup_over_eager"].items())
    check(rec["speedup_over_eager"], f"no variant ran: {rec['errors']}")


# ----------------------------------------------------------------------------------------------
def flops_per_forward(ctx, size):
    """Analytic FLOPs of one denoiser forward (linear layers + attention): only to estimate a step's time."""
    _, _, den_cfg, *_ = memory_plan.MODELS[ctx.cfg["spec"]]
    F, H, W = size
    tokens = ((F - 1) // 4 + 1) * (H // 16) * (W // 16)
    dim = den_cfg["num_attention_heads"] * den_cfg["attention_head_dim"]
    return den_cfg["num_layers"] * (2 * tokens * (4 * dim * dim + 2 * dim * den_cfg["ffn_dim"]) + 4 * tokens ** 2 * dim)


def estimate_big(ctx):
    """Step 3's time scaled by the FLOP ratio of the bigger size (None when step 3 did not run)."""
    r = ctx.results["steps"].get("3_update", {})
    if not r.get("ok"):
        return None
    ratio = flops_per_forward(ctx, ctx.cfg["big"]) / flops_per_forward(ctx, ctx.cfg["update"])
    return r["seconds"] * ratio


STEPS = [  # key, what it checks, fn(rec, ctx), estimate(ctx) -> seconds or None
    ("1_scripts", "every script's main, tiny Wan, bf16", step_scripts, None),
    ("2_sampler", "our sampler vs WanPipeline (Wan 1.3B)", step_sampler, None),
    ("3_update", "DPO + VADER update vs memory plan", lambda rec, ctx: step_updates(rec, ctx, ctx.cfg["update"]), None),
    ("4a_update_big", "the same updates, bigger video", lambda rec, ctx: step_updates(rec, ctx, ctx.cfg["big"]), estimate_big),
    ("4b_speed", "compile / attention backends vs eager", step_speed, None),
]


class Ctx:
    def __init__(self, args, dev, cfg, results):
        self.args, self.dev, self.cfg, self.results, self.t0 = args, dev, cfg, results, time.time()
        self.peak_flops = bf16_peak(torch.cuda.get_device_name(dev)) if dev.type == "cuda" else None
        self.plans, self.pool = {}, None

    def time_left(self):
        return self.args.budget_s - (time.time() - self.t0)


def main(argv=None):
    args = p.parse_args(argv)
    dev = torch.device(args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda"))
    dev = torch.device("cuda", torch.cuda.current_device()) if dev.type == "cuda" and dev.index is None else dev
    cfg = config(args.smoke, dev.type == "cuda")
    out = args.out or (os.path.join(ROOT, "runs", "gpu_check-smoke.json") if args.smoke else
                       os.path.join(HERE, "results", "gpu_check.json"))
    import diffusers
    import peft
    import transformers
    results = {"command": "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "started": datetime.datetime.now().isoformat(timespec="seconds"), "smoke": args.smoke,
               "device": str(dev), "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
               "versions": {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                            "cudnn": torch.backends.cudnn.version(), "diffusers": diffusers.__version__,
                            "transformers": transformers.__version__, "peft": peft.__version__,
                            "nccl": str(torch.cuda.nccl.version()) if dev.type == "cuda" else None},
               "config": cfg, "budget_s": args.budget_s, "steps": {}}
    ctx = Ctx(args, dev, cfg, results)
    results["bf16_peak_flops"] = ctx.peak_flops
    if dev.type == "cpu" and not args.smoke:
        results["warning"] = "no CUDA device: the full config on CPU will not finish; use --smoke"
    only = set(args.only.split(",")) if args.only else None
    if only and only - {s[0] for s in STEPS}:
        p.error(f"--only: unknown step(s) {sorted(only - {s[0] for s in STEPS})}; the steps are {[s[0] for s in STEPS]}")
    want = [s for s in STEPS if only is None or s[0] in only]
    if args.budget_s > 0 and any(k.startswith(("3", "4a")) for k, *_ in want):
        # the predictions are CPU work (fake tensors, ~20 s a row at full size): a child process computes them while
        # the device runs steps 1-2 (a process, not a thread: the plan patches module globals such as Module.to)
        ctx.pool = multiprocessing.get_context("spawn").Pool(1)
        for size in [cfg[s] for k, s in (("3", "update"), ("4a", "big")) if any(w[0].startswith(k) for w in want)]:
            for kind in ("dpo", "vader"):
                ctx.plans[(kind, size)] = ctx.pool.apply_async(plan_peak, (cfg["spec"], kind, size))
    try:
        for key, title, fn, estimate in want:
            rec = results["steps"][key] = {"title": title}
            est = estimate(ctx) if estimate else None
            if ctx.time_left() <= 0 or (est is not None and est > ctx.time_left()):
                rec |= {"ok": None, "skipped": f"budget ({ctx.time_left():.0f} s left" +
                        (f", estimated {est:.0f} s)" if est is not None else ")")}
                continue
            print(f"[gpu_check] {key}: {title} ({time.time() - ctx.t0:.0f} s elapsed)", flush=True)
            t0 = time.time()
            try:
                fn(rec, ctx)
                rec["ok"] = True
            except Exception as e:  # recorded; the next step still runs
                rec |= {"ok": False, "error": f"{type(e).__name__}: {e}"[:1000], "traceback": traceback.format_exc()[-3000:]}
            rec["seconds"] = time.time() - t0
            release()
            results["elapsed_s"] = time.time() - ctx.t0
            common.save_json(out, results)
    finally:
        if ctx.pool is not None:  # (a prediction still running, for a step the budget skipped, is not waited for)
            done = all(r.ready() for r in ctx.plans.values())
            ctx.pool.close() if done else ctx.pool.terminate()
            ctx.pool.join()
            ctx.pool = ctx.plans = None  # (released now, not at interpreter exit: no leaked-semaphore warning)
        results["elapsed_s"] = time.time() - ctx.t0
        common.save_json(out, results)
    print_table(results, out)
    return results


def print_table(results, out):
    print(f"\nGPU check on {results['gpu'] or results['device']} (torch {results['versions']['torch']}, "
          f"CUDA {results['versions']['cuda']}), {results['elapsed_s']:.0f} s; JSON: {out}")
    print(f"| {'step':14s} | {'status':7s} | {'s':>6s} | figures |")
    print(f"|{'-' * 16}|{'-' * 9}|{'-' * 8}|---------|")
    for key, rec in results["steps"].items():
        status = {True: "ok", False: "FAILED", None: "skipped"}[rec.get("ok")]
        text = rec.get("summary") or rec.get("skipped") or ""
        if rec.get("ok") is False:
            text = (rec.get("summary", "") + " | " if rec.get("summary") else "") + rec["error"].splitlines()[0][:200]
        print(f"| {key:14s} | {status:7s} | {rec.get('seconds', 0):6.1f} | {text} |")


if __name__ == "__main__":
    res = main()
    sys.exit(1 if any(r.get("ok") is False for r in res["steps"].values()) else 0)
