"""VADER's memory ladder, measured: peak memory and time of one reward-gradient step for
  full backprop through every sampler step -> truncated (K = 1) -> + gradient checkpointing
  -> + frame subsampling (one decoded frame),
on the same tiny random Wan (transformer + 3D VAE, built from config classes) and video size.
Each configuration runs in its own process so peak figures do not leak between them. On CUDA the
figure is torch.cuda.max_memory_allocated; on CPU the growth of the process's peak RSS over its
RSS after loading (both printed). VADER reports 276 -> 229 -> 69 -> 32.5 GB on ModelScope, in a
different order (frame subsampling before truncation); the direction is what we compare.

    python benchmarks/vader_memory.py                  # CPU, ~2 minutes
    python benchmarks/vader_memory.py --device cuda --frames 33 --size 256 --layers 8
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

LADDER = [  # name, grad_from (None = all steps), checkpointing, decode frames
    ("full backprop, all steps", "all", False, "all"),
    ("truncated, K=1", "last", False, "all"),
    ("truncated + checkpointing", "last", True, "all"),
    ("truncated + checkpointing + 1 frame", "last", True, "one"),
]

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--device", default="cpu", help="cpu or cuda")
p.add_argument("--frames", type=int, default=17, help="video frames (4k+1)")
p.add_argument("--size", type=int, default=128, help="height = width")
p.add_argument("--layers", type=int, default=4, help="transformer layers")
p.add_argument("--dim", type=int, default=192, help="transformer width (heads x 64 ... here heads x 32)")
p.add_argument("--steps", type=int, default=6, help="sampler steps")
p.add_argument("--batch", type=int, default=1, help="videos per step")
p.add_argument("--repeats", type=int, default=2, help="timed steps per configuration (after one warm-up)")
p.add_argument("--json", default=None, help="also write the figures to this JSON file")
p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
p.add_argument("--folder", default=None, help=argparse.SUPPRESS)


def build(folder, args):
    import diffusers
    import tiny_models
    torch.manual_seed(0)
    pipe = diffusers.WanPipeline(
        tokenizer=tiny_models.word_tokenizer(16), text_encoder=tiny_models.t5_encoder(),
        transformer=diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=args.dim // 32,
                                                    attention_head_dim=32, in_channels=16, out_channels=16, text_dim=32,
                                                    freq_dim=64, ffn_dim=args.dim * 2, num_layers=args.layers,
                                                    rope_max_seq_len=256),
        vae=diffusers.AutoencoderKLWan(base_dim=32, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                       temperal_downsample=[False, True, True]),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.save_pretrained(folder)


def rss_gb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def child(args):
    import common
    import models
    name, mode, ckpt, frames = LADDER[args.child]
    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    model = models.load_model(args.folder, args.device)
    params = common.setup_trainable(model, lora_rank=8)
    grad_from = 0 if mode == "all" else args.steps - 1
    decode = [args.frames // 2] if frames == "one" else None
    prompts = ["a red ball falling"] * args.batch

    def step(seed):
        _, video = common.sample(model, prompts, list(range(seed, seed + args.batch)), args.frames, args.size, args.size,
                                 args.steps, 4.0, grad_from=grad_from, grad_checkpointing=ckpt, decode_frames=decode)
        video.mean().backward()  # a stand-in differentiable reward: the cost is in the graph, not in the reward
        for q in params:
            q.grad = None

    base = rss_gb()  # model loaded, nothing run yet
    step(0)  # warm-up
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    for r in range(args.repeats):
        step(100 + r)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    sec = (time.time() - t0) / args.repeats
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    gpu = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
    print(json.dumps({"config": name, "sec_per_step": sec, "peak_rss_gb": peak_rss, "rss_after_load_gb": base, "growth_gb": peak_rss - base,
                      "peak_gpu_gb": gpu, "grad_steps": args.steps - grad_from, "decoded_frames": len(decode or range(args.frames))}))


def main(args):
    with tempfile.TemporaryDirectory() as folder:
        build(folder, args)
        rows = []
        for i in range(len(LADDER)):
            flags = [f"--{k}={getattr(args, k)}" for k in ("device", "frames", "size", "layers", "dim", "steps", "batch",
                                                           "repeats")]
            cmd = [sys.executable, __file__, "--child", str(i), "--folder", folder] + flags
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                raise SystemExit(res.stderr[-3000:])
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    mem_key = "peak_gpu_gb" if args.device.startswith("cuda") else "growth_gb"
    print(f"\nVADER memory ladder: tiny random Wan (dim {args.dim}, {args.layers} layers) + Wan VAE, {args.frames} frames "
          f"{args.size}x{args.size}, {args.steps} sampler steps, batch {args.batch}, LoRA r8, {args.device}")
    what = "peak GPU memory (GB)" if args.device.startswith("cuda") else "peak RSS growth over the loaded model (GB)"
    print(f"| configuration | grad-carrying steps | decoded frames | {what} | s/step |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['grad_steps']} | {r['decoded_frames']} | {r[mem_key]:.2f} | {r['sec_per_step']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    a = p.parse_args()
    child(a) if a.child is not None else main(a)
