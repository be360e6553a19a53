"""Which gradient checkpointing VADER's grad-carrying sampler steps should use, measured: per-call
(torch.utils.checkpoint around each denoiser call), per-block (the denoiser's own
enable_gradient_checkpointing) or both (what common.sample does). Peak = bytes of tensor storages
allocated during one reward-gradient step and alive at once (a dispatch-mode tracker with weakref
finalizers: exact on CPU, no allocator noise); forwards = calls of the first transformer block,
recomputation included. Each configuration runs in its own process.

    python benchmarks/vader_checkpointing.py          # CPU, ~2 minutes
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.dirname(os.path.abspath(__file__))]
MODES = ["both", "block", "call"]

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--frames", type=int, default=17, help="video frames (4k+1)")
p.add_argument("--size", type=int, default=192, help="height = width")
p.add_argument("--layers", type=int, default=8, help="transformer layers")
p.add_argument("--dim", type=int, default=384, help="transformer width")
p.add_argument("--steps", type=int, default=4, help="sampler steps")
p.add_argument("--k", default="1,3", help="grad-carrying sampler steps K to measure, comma-separated")
p.add_argument("--json", default=None, help="also write the figures to this JSON file")
p.add_argument("--child", default=None, help=argparse.SUPPRESS)
p.add_argument("--folder", default=None, help=argparse.SUPPRESS)


class LivePeak(TorchDispatchMode):
    """Peak bytes of the tensor storages created inside the region that are alive at the same time."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.seen = 0, 0, set()

    def track(self, t):
        st = t.untyped_storage()
        key, n = st.data_ptr(), st.nbytes()
        if n == 0 or key in self.seen:
            return
        self.seen.add(key)
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(st, self.free, key, n)

    def free(self, key, n):
        self.live -= n
        self.seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


def child(args):
    import common
    import models
    mode, k = args.child.split(":")
    k = int(k)
    torch.set_num_threads(1)
    model = models.load_model(args.folder)
    params = common.setup_trainable(model, lora_rank=8)
    den = model.denoiser
    if mode == "call":  # common.sample turns the denoiser's own checkpointing on: keep it off here
        den.enable_gradient_checkpointing = lambda *a, **kw: None
    forwards = [0]
    den.blocks[0].register_forward_pre_hook(lambda *a: forwards.__setitem__(0, forwards[0] + 1))

    def step():
        if mode == "block":
            den.enable_gradient_checkpointing()
        _, video = common.sample(model, ["a red ball falling"], [1], args.frames, args.size, args.size, args.steps, 4.0,
                                 grad_from=args.steps - k, grad_checkpointing=mode != "block", decode_frames=[0])
        video.mean().backward()
        for q in params:
            q.grad = None

    step()  # warm-up
    forwards[0] = 0
    tracker = LivePeak()
    t0 = time.time()
    with tracker:
        step()
    print(json.dumps({"mode": mode, "K": k, "peak_mib": tracker.peak / 2**20, "block_forwards": forwards[0],
                      "sec": time.time() - t0}))


def main(args):
    import vader_memory
    with tempfile.TemporaryDirectory() as folder:
        vader_memory.build(folder, vader_memory.p.parse_args([f"--frames={args.frames}", f"--size={args.size}",
                                                              f"--layers={args.layers}", f"--dim={args.dim}"]))
        rows = []
        for k in args.k.split(","):
            for mode in MODES:
                flags = [f"--{n}={getattr(args, n)}" for n in ("frames", "size", "layers", "dim", "steps")]
                res = subprocess.run([sys.executable, __file__, "--child", f"{mode}:{k}", "--folder", folder] + flags,
                                     capture_output=True, text=True)
                if res.returncode:
                    raise SystemExit(res.stderr[-3000:])
                rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(f"\nVADER checkpointing: tiny random Wan (dim {args.dim}, {args.layers} layers), {args.frames} frames "
          f"{args.size}x{args.size}, {args.steps} sampler steps, CFG, LoRA r8, 1 decoded frame, CPU")
    print("| checkpointing | K | peak (MiB) | block forwards | s/step |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['K']} | {r['peak_mib']:.1f} | {r['block_forwards']} | {r['sec']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python " + " ".join(sys.argv), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    a = p.parse_args()
    child(a) if a.child else main(a)
