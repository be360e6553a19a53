"""Issue #30's levers for online Diffusion-DPO on the toy model, paired over seeds.

    python benchmarks/dpo_levers.py --seeds 5 --jobs 2                      # every configuration, CPU
    python benchmarks/dpo_levers.py --only paper recipe --device cuda --jobs 12
    python benchmarks/dpo_levers.py --aggregate-only                        # tables from finished runs
    python benchmarks/dpo_levers.py --smoke --out /tmp/levers               # 2 steps: the plumbing only (CI)

Each configuration is `online_vpo.py` (or another DPO script) with flags; each seed fixes prompts, candidates,
DPO noise and the evaluation videos, so a configuration's gain (held-out reward at the end minus at step 0) is
paired per seed, and two configurations are compared seed by seed. Every run evaluates 52 held-out prompts x
4 seeds (noise floor below 0.005) and logs the implicit accuracy on 16 fresh held-out pairs. A finished run is
skipped (its flags must match), so the sweep resumes where it stopped. Writes <out>/levers.json and
<out>/levers.md (the table in docs/dpo_levers.md).
"""
import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from claims import mean_std, paired_ci  # noqa: E402  (Student-t paired intervals, shared with the claims sweep)

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--only", nargs="*", default=None, help="configurations to run (default: all; names in CONFIGS)")
p.add_argument("--seeds", type=int, default=5, help="paired seeds per configuration")
p.add_argument("--first-seed", type=int, default=0, help="first seed (fresh seeds confirm a configuration chosen on others)")
p.add_argument("--jobs", type=int, default=2, help="runs in parallel")
p.add_argument("--threads", type=int, default=1, help="CPU threads per run")
p.add_argument("--device", default="cpu", help="cpu or cuda (runs share the GPU)")
p.add_argument("--out", default=os.path.join(ROOT, "runs", "dpo_levers"), help="run folders, levers.json and levers.md")
p.add_argument("--aggregate-only", action="store_true", help="write the tables from finished runs, start none")
p.add_argument("--smoke", action="store_true", help="2 steps, 1 seed, tiny evaluation: the plumbing only")
p.add_argument("--deadline-s", type=float, default=None, help="start no new run after this many seconds (then aggregate)")

EVAL = {"--eval-seeds": 4, "--num-eval-prompts": 52, "--heldout-pairs": 16, "--eval-every": 1000, "--save-every": 1000}
PAPER = {"script": "online_vpo.py", "--recipe": "paper"} | EVAL  # OnlineVPO as the paper specifies it (independent
# samples, 1 draw): the toy default until the toy recipe became it, so runs kept from before ran it without the flag
RECIPE = {"--branch-at": 2, "--dpo-draws": 4, "--dpo-epochs": 2, "--timestep-sampling": "logit-normal"}
ANCHOR = RECIPE | {"--data-anchor": 1, "--beta": 2000, "--lr": 3e-4}  # the best recipe found (docs/dpo_levers.md)
CONFIGS = {
    "paper": PAPER,
    "lr3e-4": PAPER | {"--lr": 3e-4},
    "branch2": PAPER | {"--branch-at": 2},
    "branch4": PAPER | {"--branch-at": 4},
    "draws4": PAPER | {"--dpo-draws": 4},
    "draws4_epochs2": PAPER | {"--dpo-draws": 4, "--dpo-epochs": 2},
    "logitnormal": PAPER | {"--timestep-sampling": "logit-normal"},
    "pairs_all": PAPER | {"--pairing": "all"},
    "beta1000_lr3e-4": PAPER | {"--beta": 1000, "--lr": 3e-4},
    "beta2000_lr1e-3": PAPER | {"--beta": 2000, "--lr": 1e-3},
    "recipe": PAPER | RECIPE,
    "recipe_lr3e-4": PAPER | RECIPE | {"--lr": 3e-4},
    "recipe_beta1000_lr3e-4": PAPER | RECIPE | {"--beta": 1000, "--lr": 3e-4},
    "recipe_beta1000_lr1e-3": PAPER | RECIPE | {"--beta": 1000, "--lr": 1e-3},
    "recipe_all_lr3e-4": PAPER | RECIPE | {"--pairing": "all", "--lr": 3e-4},
    "recipe_branch4_lr3e-4": PAPER | RECIPE | {"--branch-at": 4, "--lr": 3e-4},
    "recipe_n8_lr3e-4": PAPER | RECIPE | {"--num-candidates": 8, "--lr": 3e-4},
    "recipe_noref_lr3e-4": PAPER | RECIPE | {"--ref-update-interval": 0, "--lr": 3e-4},
    "recipe_branch0_lr3e-4": PAPER | RECIPE | {"--branch-at": 0, "--lr": 3e-4},
    "independent_draws4_epochs2_lr3e-4": PAPER | {"--dpo-draws": 4, "--dpo-epochs": 2, "--lr": 3e-4},
    "recipe_beta2000_lr1e-3": PAPER | RECIPE | {"--beta": 2000, "--lr": 1e-3},
    "independent_beta2000_lr1e-3": PAPER | RECIPE | {"--branch-at": None, "--beta": 2000, "--lr": 1e-3},
    "recipe_beta2000_lr3e-4": PAPER | RECIPE | {"--beta": 2000, "--lr": 3e-4},
    "recipe_dpop2_beta2000_lr3e-4": PAPER | RECIPE | {"--dpop": 2, "--beta": 2000, "--lr": 3e-4},
    "recipe_anchor1_beta2000_lr3e-4": PAPER | RECIPE | {"--data-anchor": 1, "--beta": 2000, "--lr": 3e-4},
    "recipe_anchor1_beta2000_lr1e-3": PAPER | RECIPE | {"--data-anchor": 1, "--beta": 2000, "--lr": 1e-3},
    # session 18: the levers of issue #30 not yet run, each on top of the best recipe (the data anchor)
    "anchor_n8": PAPER | ANCHOR | {"--num-candidates": 8},
    "anchor_all_draws1": PAPER | ANCHOR | {"--pairing": "all", "--dpo-draws": 1},
    "anchor_noref": PAPER | ANCHOR | {"--ref-update-interval": 0},
    "anchor_beta5000": PAPER | ANCHOR | {"--beta": 5000},
    "anchor_cfg2": PAPER | ANCHOR | {"--guidance": 2.0},
    "anchor_steps20": PAPER | ANCHOR | {"--sample-steps": 20},
    "recipe_anchor1_dpop2_beta2000_lr1e-3": PAPER | RECIPE | {"--data-anchor": 1, "--dpop": 2, "--beta": 2000,
                                                              "--lr": 1e-3},
}


def argv_of(cfg, seed, out, args):
    argv = [sys.executable, os.path.join(ROOT, cfg["script"]), "--seed", str(seed), "--out", out, "--device", args.device,
            "--sample-batch-size", "64" if args.device != "cpu" else "8"]
    for k, v in cfg.items():
        if k == "script" or v is False or v is None:
            continue
        argv += [k] if v is True else [k, str(v)]
    if args.smoke:
        argv += ["--steps", "2", "--batch-size", "2", "--num-eval-prompts", "2", "--eval-seeds", "1", "--heldout-pairs", "2"]
    return argv


def finished(out, argv):
    """The run ended (its final evaluation is logged) with the same command."""
    try:
        config = json.load(open(os.path.join(out, "config.json")))
        rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    except (OSError, ValueError):
        return False
    evals = [r for r in rows if r.get("eval")]
    return len(evals) >= 2 and evals[-1]["step"] == config["steps"] and same_flags(config.get("levers_argv"), argv[2:])


def same_flags(a, b):
    """Two runs' flags agree, wherever their folders are (--out left out): a kept run may move."""
    def strip(argv):
        argv = list(argv or [])
        if "--out" in argv:
            i = argv.index("--out")
            del argv[i: i + 2]
        if "--recipe" in argv and argv[argv.index("--recipe") + 1] == "paper":  # (see PAPER: runs kept from
            i = argv.index("--recipe")  # before the flag ran the paper's recipe without it)
            del argv[i: i + 2]
        return argv
    return a is not None and strip(a) == strip(b)


def run_one(name, seed, args, t_start=None):
    out = os.path.join(args.out, f"{name}_s{seed}")
    argv = argv_of(CONFIGS[name], seed, out, args)
    if finished(out, argv):
        return name, seed, "kept"
    if args.deadline_s and time.time() - t_start > args.deadline_s:
        return name, seed, "not started (--deadline-s)"
    if os.path.exists(out):
        subprocess.run(["rm", "-rf", out], check=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
    t0 = time.time()
    res = subprocess.run(argv, env=env, capture_output=True, text=True)
    if res.returncode:
        return name, seed, "FAILED: " + res.stderr[-2000:]
    config = json.load(open(os.path.join(out, "config.json")))
    config |= {"levers_argv": argv[2:], "levers_seconds": time.time() - t0}
    json.dump(config, open(os.path.join(out, "config.json"), "w"), indent=1)
    return name, seed, f"done in {time.time() - t0:.0f} s"


def read(name, seed, args):
    out = os.path.join(args.out, f"{name}_s{seed}")
    if not finished(out, argv_of(CONFIGS[name], seed, out, args)):
        return None
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    evals, steps = [r for r in rows if r.get("eval")], [r for r in rows if not r.get("eval")]
    config = json.load(open(os.path.join(out, "config.json")))
    first, last = evals[0], evals[-1]
    dims = [k for k in first if k.startswith("eval/") and k != "eval/heldout_implicit_acc"]
    return {"gain": {k: last[k] - first[k] for k in dims}, "before": {k: first[k] for k in dims},
            "heldout_acc": last.get("eval/heldout_implicit_acc"), "reward": config["reward_name"],
            "loss": sum(r["loss"] for r in steps) / len(steps), "seconds": config.get("levers_seconds")}


def aggregate(args):
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    table, paper = {}, {s: read("paper", s, args) for s in seeds}
    for name in CONFIGS:
        runs = {s: read(name, s, args) for s in seeds}
        done = [s for s in seeds if runs[s]]
        if not done:
            continue
        gains = {k: [runs[s]["gain"][k] for s in done] for k in runs[done[0]]["gain"]}
        row = {"seeds": done, "reward": runs[done[0]]["reward"], "per_seed_gain": gains["eval/reward"],
               "loss": mean_std([runs[s]["loss"] for s in done])[0],
               "heldout_acc": mean_std([runs[s]["heldout_acc"] for s in done])[0],
               "minutes": mean_std([runs[s]["seconds"] or 0 for s in done])[0] / 60}
        for k, g in gains.items():  # the gain of every dimension, its 95% CI over seeds (paired: after - before)
            row[k] = paired_ci(g, [0.0] * len(g)) if len(g) > 1 else (g[0], g[0], g[0])
        both = [s for s in done if paper[s]]
        if name != "paper" and len(both) > 1:  # against the paper's configuration, seed by seed
            row["vs_paper"] = paired_ci([runs[s]["gain"]["eval/reward"] for s in both],
                                        [paper[s]["gain"]["eval/reward"] for s in both])
        table[name] = row
    return table


def markdown(table):
    dims = ["visual_quality", "temporal_consistency", "dynamic_degree", "text_alignment", "physics", "color_accuracy"]
    lines = ["| configuration | n | trained reward gain [95% CI] | vs paper [95% CI] | largest other fall | "
             "held-out pair acc | mean DPO loss | min/run |", "|---|---|---|---|---|---|---|---|"]
    for name, r in table.items():
        m, lo, hi = r["eval/reward"]
        vs = r.get("vs_paper")
        trained = r["reward"].split(":")[-1]
        falls = [(r[f"eval/{d}"][0], d) for d in dims if f"eval/{d}" in r and not trained.startswith(d.split("_")[0])]
        fall, dim = min(falls) if falls else (0.0, "-")
        ci = f" [{lo:+.4f}, {hi:+.4f}]" if len(r["seeds"]) > 1 else " (one seed: no interval)"
        lines.append(f"| `{name}` | {len(r['seeds'])} | {m:+.4f}{ci} | "
                     + (f"{vs[0]:+.4f} [{vs[1]:+.4f}, {vs[2]:+.4f}]" if vs else "-")
                     + f" | {fall:+.4f} ({dim}) | {r['heldout_acc']:.2f} | {r['loss']:.3f} | {r['minutes']:.1f} |")
    return "\n".join(lines) + "\n"


def main(args):
    if args.smoke:
        args.seeds = 1
    names = args.only or list(CONFIGS)
    for n in names:
        if n not in CONFIGS:
            raise SystemExit(f"--only {n}: unknown configuration; choose from {', '.join(CONFIGS)}")
    os.makedirs(args.out, exist_ok=True)
    if not args.aggregate_only:
        jobs = [(n, s) for s in range(args.first_seed, args.first_seed + args.seeds) for n in names]
        t_start = time.time()
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            for name, seed, status in pool.map(lambda j: run_one(*j, args, t_start), jobs):
                print(f"{name} seed {seed}: {status}", flush=True)
    table = aggregate(args)
    json.dump(table, open(os.path.join(args.out, "levers.json"), "w"), indent=1)
    md = markdown(table)
    open(os.path.join(args.out, "levers.md"), "w").write(md)
    print(md)
    return table


if __name__ == "__main__":
    main(p.parse_args())
