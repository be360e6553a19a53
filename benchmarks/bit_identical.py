"""Proof that a refactor did not change behaviour: short runs of every script, fingerprinted bit for bit.

    python benchmarks/bit_identical.py --record   # before the refactor: writes benchmarks/results/bit_identical.json
    python benchmarks/bit_identical.py            # after it: reruns the same commands and compares (exit 1 on a change)

Each run is a script's default run cut to its first 3 steps (RWR: its first round), plus two on a tiny random
Wan 2.1 pipeline (tests/tiny_models.py, built from config classes; torchrun equality is the tests' job). What is compared: every row of metrics.jsonl with the timing fields
dropped (floats as logged; peak memory is the machine's too), and the SHA-256 of every file of the saved LoRA
(its tensors and metadata for the weights).
Runs use one CPU thread, so the arithmetic order is fixed.
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
p.add_argument("--record", action="store_true", help="write the fingerprints instead of comparing with them")
p.add_argument("--only", nargs="*", default=None, help="run names to run (default: all)")
p.add_argument("--file", default=os.path.join(ROOT, "benchmarks", "results", "bit_identical.json"),
               help="the recorded fingerprints")
p.add_argument("--work", default=None, help="where the runs go (default: a temporary folder)")
TIMING = ("sec", "samples_per_s", "time", "elapsed", "peak_mem")  # fields that measure the machine, not the algorithm

TINY = ["--num-frames", "5", "--height", "16", "--width", "16", "--sample-steps", "2", "--num-eval-prompts", "2",
        "--prompts", "{prompts}", "--eval-prompts", "{prompts}", "--reward", "toy:temporal"]
RUNS = {  # name -> argv after `python`
    "online_vpo": ["online_vpo.py", "--steps", "3", "--recipe", "paper"],  # (the default until the toy recipe)
    "gran_dpo": ["gran_dpo.py", "--steps", "3"],
    "vader_grad": ["vader_grad.py", "--steps", "3"],
    "vlm_feedback_rwr": ["vlm_feedback_rwr.py", "--rounds", "1"],
    "online_vpo_tiny_wan": ["online_vpo.py", "--model", "{wan}", "--steps", "3", "--batch-size", "2",
                            "--num-candidates", "2"] + TINY,
    "vader_grad_tiny_wan": ["vader_grad.py", "--model", "{wan}", "--steps", "3", "--batch-size", "2",
                            "--diversity-prompts", "2"] + TINY,
}


def digest(path):
    """SHA-256 of a file's content; for safetensors, of its tensors (name, dtype, shape, bytes, in name order) and
    metadata, since the header's key order is not fixed from one process to the next."""
    if not path.endswith(".safetensors"):
        return hashlib.sha256(open(path, "rb").read()).hexdigest()
    from safetensors import safe_open
    h = hashlib.sha256()
    with safe_open(path, "pt") as f:
        h.update(json.dumps(f.metadata(), sort_keys=True).encode())
        for k in sorted(f.keys()):
            t = f.get_tensor(k)
            h.update(f"{k} {t.dtype} {tuple(t.shape)}".encode())
            h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint(out):
    rows = []
    for line in open(os.path.join(out, "metrics.jsonl")):
        row = json.loads(line)
        rows.append({k: v for k, v in row.items() if not any(t in k for t in TIMING)})
    loras = {}
    for folder, _, files in os.walk(out):
        if os.path.basename(folder) == "lora" or "lora" in os.path.relpath(folder, out).split(os.sep):
            for f in sorted(files):
                path = os.path.join(folder, f)
                if f.endswith(".md"):
                    continue  # the model card names the run folder
                loras[os.path.relpath(path, out)] = digest(path)
    return {"metrics": rows, "lora": loras}


def main(args):
    work = args.work or tempfile.mkdtemp(prefix="bit_identical_")
    wan = os.path.join(work, "tiny_wan")
    prompts = os.path.join(work, "prompts.txt")
    if not os.path.exists(wan):
        import tiny_models
        tiny_models.build("wan", wan)
        with open(prompts, "w") as f:
            f.write("a red square moving left\na blue circle falling\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONHASHSEED="0")
    recorded = json.load(open(args.file)) if os.path.exists(args.file) else {}
    results, changed = {}, []
    for name, argv in RUNS.items():
        if args.only and name not in args.only:
            continue
        out = os.path.join(work, name)
        argv = [a.format(wan=wan, prompts=prompts) for a in argv] + ["--out", out]
        print(f"[{name}] python {' '.join(argv)}", flush=True)
        res = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True)
        if res.returncode:
            print(res.stdout[-3000:], res.stderr[-3000:])
            raise SystemExit(f"{name} failed")
        results[name] = fingerprint(out)
        if not args.record:
            same = recorded.get(name) == results[name]
            changed += [] if same else [name]
            print(f"[{name}] {'bit-identical' if same else 'CHANGED'} ({len(results[name]['metrics'])} metric rows, "
                  f"{len(results[name]['lora'])} LoRA files)", flush=True)
    if args.record:
        recorded.update(results)
        os.makedirs(os.path.dirname(args.file), exist_ok=True)
        json.dump(recorded, open(args.file, "w"), indent=1)
        print(f"recorded {sorted(results)} in {args.file}")
    elif changed:
        raise SystemExit(f"changed: {changed}")
    else:
        print(f"all {len(results)} runs bit-identical to {args.file}")


if __name__ == "__main__":
    main(p.parse_args())
