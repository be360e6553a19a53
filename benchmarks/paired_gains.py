"""Paired gains of finished runs: each held-out figure's change from the run's first evaluation (step 0) to its
last, per run (a seed fixes prompts, samples and evaluation noise, so the change is paired), then the mean over runs
with its 95% interval (t, n - 1 degrees of freedom).

    python benchmarks/paired_gains.py runs/grpo_lr3e-4_s0 runs/grpo_lr3e-4_s1 ...   # run folders (metrics.jsonl)
"""
import argparse
import json
import os

from claims import T975, mean_std  # (the claims sweep's own t table and mean / sample std)

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("runs", nargs="+", help="run folders, each with its metrics.jsonl")


def gains(run):
    evals = [r for r in map(json.loads, open(os.path.join(run, "metrics.jsonl"))) if r.get("eval")]
    first, last = evals[0], evals[-1]
    return {k: last[k] - first[k] for k in first if k.startswith("eval/") and k in last}, first, last


def interval(values):
    m, sd = mean_std(values)
    return m, (T975.get(len(values) - 1, 1.96) * sd / len(values) ** 0.5 if len(values) > 1 else float("nan"))


def main(args):
    per = {}
    for run in args.runs:
        g, first, last = gains(run)
        print(f"{run}: step {first['step']} -> {last['step']}, eval/reward {first['eval/reward']:.4f} -> "
              f"{last['eval/reward']:.4f} ({g['eval/reward']:+.4f})")
        for k, v in g.items():
            per.setdefault(k, []).append(v)
    print(f"\n| held-out figure | mean gain over {len(args.runs)} runs [95% CI] |\n|---|---|")
    for k, v in per.items():
        m, h = interval(v)
        print(f"| {k[5:]} | {m:+.4f} [{m - h:+.4f}, {m + h:+.4f}] |")


if __name__ == "__main__":
    main(p.parse_args())
