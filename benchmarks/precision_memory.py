"""Peak tensor memory of a whole run, fp32 vs bf16 (--mixed-precision): each script's real main() for one
optimisation step (model and reward loading, the step-0 and final evaluations included), with every tensor
storage created in the process tracked while alive (benchmarks/vader_checkpointing.py's LivePeak: exact on
CPU, the figure torch.cuda.max_memory_allocated would give on a GPU, less the allocator's caching). In
bf16 the frozen weights (text encoder, VAE, base denoiser, reward) are stored in bf16, LoRA stays fp32.
Models: the shipped toy model and a small random Wan with VAE (benchmarks/vader_memory.py's, dim 192,
4 layers, 17 frames at 128x128). Each configuration runs in its own process.

    python benchmarks/precision_memory.py      # CPU, ~3 minutes
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.dirname(os.path.abspath(__file__))]
SCRIPTS = {"online_vpo": ["--batch-size", "2", "--num-candidates", "2", "--min-margin", "0", "--recipe", "paper"],
           "vader_grad": ["--batch-size", "2"]}

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--json", default=None, help="also write the figures to this JSON file")
p.add_argument("--child", default=None, help=argparse.SUPPRESS)
p.add_argument("--wan", default=None, help=argparse.SUPPRESS)


def child(args):
    import importlib
    from vader_checkpointing import LivePeak
    script, model, mp = args.child.split(":")
    torch.set_num_threads(1)
    mod = importlib.import_module(script)
    argv = SCRIPTS[script] + ["--steps", "1", "--num-eval-prompts", "2", "--mixed-precision", mp, "--lora-rank", "8"]
    if script == "vader_grad":
        argv += ["--diversity-prompts", "1", "--diversity-seeds", "2"]
    if model == "wan":
        argv += ["--model", args.wan, "--num-frames", "17", "--height", "128", "--width", "128", "--sample-steps", "4",
                 "--reward", "toy:temporal" if script == "online_vpo" else "toy:quality"]
    with tempfile.TemporaryDirectory() as out:
        tracker = LivePeak()
        with tracker:
            mod.main(mod.p.parse_args(argv + ["--out", os.path.join(out, "run")]))
    print(json.dumps({"script": script, "model": model, "mixed_precision": mp, "peak_mib": tracker.peak / 2**20}))


def main(args):
    import vader_memory
    rows = []
    with tempfile.TemporaryDirectory() as wan:
        vader_memory.build(wan, vader_memory.p.parse_args([]))
        for script in SCRIPTS:
            for model in ("toy", "wan"):
                for mp in ("no", "bf16"):
                    res = subprocess.run([sys.executable, __file__, "--child", f"{script}:{model}:{mp}", "--wan", wan],
                                         capture_output=True, text=True, cwd=ROOT)
                    if res.returncode:
                        raise SystemExit(res.stderr[-3000:])
                    rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print("\n| script | model | fp32 peak (MiB) | bf16 peak (MiB) | bf16 / fp32 |\n|---|---|---|---|---|")
    for a, b in zip(rows[0::2], rows[1::2]):
        print(f"| {a['script']} | {a['model']} | {a['peak_mib']:.1f} | {b['peak_mib']:.1f} | {b['peak_mib'] / a['peak_mib']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python " + " ".join(sys.argv), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    a = p.parse_args()
    child(a) if a.child else main(a)
