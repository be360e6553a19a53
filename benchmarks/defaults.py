"""The five scripts' default runs on the toy model, each judged by the rule a default must meet: its trained
reward rises on the held-out prompts and no other held-out dimension (colour accuracy included) falls by more
than 0.05; RWR must raise the judge's held-out pass rate.

    python benchmarks/defaults.py                       # the five default runs, one after the other
    python benchmarks/defaults.py --only vlm_feedback_rwr --threads 2
    python benchmarks/defaults.py --report              # the tables from the finished runs only

Each run is the plain `python <script>.py` (plus --out, and any --extra flags, which the table then names);
runs are resumable: a finished run is read, an interrupted one resumed. Prints, per script, every held-out
figure at the start and the end with its change, writes benchmarks/results/defaults.json and a before/after
GIF per script (assets/<online_vpo|gran_dpo|vader|rwr|flow_grpo>_before_after.gif: left the first evaluation's videos, right the last's, the
same prompts and seeds).
"""
import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["online_vpo", "gran_dpo", "vader_grad", "vlm_feedback_rwr", "flow_grpo"]
GIFS = {"online_vpo": "online_vpo", "gran_dpo": "gran_dpo", "vader_grad": "vader", "vlm_feedback_rwr": "rwr",
        "flow_grpo": "flow_grpo"}
TOLERANCE = 0.05  # the most any other held-out dimension may fall

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--only", nargs="*", default=SCRIPTS, choices=SCRIPTS, help="scripts to run")
p.add_argument("--runs", default=os.path.join(ROOT, "runs", "defaults"), help="folder of the runs (one per script)")
p.add_argument("--threads", type=int, default=2, help="torch threads per run (OMP_NUM_THREADS)")
p.add_argument("--extra", default="", help="flags added to every run, e.g. '--steps 10' (a run's command is printed with its table)")
p.add_argument("--report", action="store_true", help="run nothing: the tables (and GIFs) from finished runs only")
p.add_argument("--no-gif", action="store_true", help="do not write the before/after GIFs")
p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "defaults.json"), help="JSON output")


def evals(folder):
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    return [r for r in map(json.loads, open(path)) if r.get("eval")]


def finished(folder):
    cfg = os.path.join(folder, "config.json")
    if not os.path.exists(cfg):
        return False
    c, rows = json.load(open(cfg)), evals(folder)
    last = c.get("rounds", c.get("steps"))
    return bool(rows) and rows[-1].get("round", rows[-1]["step"]) == last


def run(script, folder, threads, extra):
    cmd = [sys.executable, os.path.join(ROOT, f"{script}.py"), "--out", folder] + shlex.split(extra)
    if os.path.exists(os.path.join(folder, "metrics.jsonl")):  # interrupted: resume it
        if script == "vlm_feedback_rwr":  # (resumes from its judge cache even before its first checkpoint)
            cmd += ["--resume", folder]
        else:
            sys.path.insert(0, ROOT)
            import common
            try:
                cmd += ["--resume", common.latest_checkpoint(folder)]
            except FileNotFoundError:  # stopped before its first checkpoint: start again, the old folder kept aside
                os.replace(folder, f"{folder}.interrupted-{time.strftime('%Y%m%d-%H%M%S')}")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    print("running:", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    return time.time() - t0


def trained_key(script, config):
    """The held-out figure a run trains on: the judge's pass rate (RWR), else its toy reward's dimension."""
    if script == "vlm_feedback_rwr":
        return "eval/pass_rate"
    return "eval/" + config["reward_name"].split(":")[-1]  # e.g. toy:text_alignment -> eval/text_alignment


def judge(script, rows, config):
    """(figures: {key: (before, after, change)}, trained key, list of the dimensions that fell too far)."""
    first, last = rows[0], rows[-1]
    keys = [k for k in first if k.startswith("eval/") and k in last and isinstance(first[k], (int, float))
            and k not in ("eval/reward", "eval/mean", "eval/frame")]  # (the last two: averages of the others)
    figures = {k: (first[k], last[k], last[k] - first[k]) for k in keys}
    trained = trained_key(script, config)
    # shown, not judged: RWR's pass rate per category (its own figure's parts), VADER's diversity and Gran-DPO's
    # defective-patch count (a count, lower is better: the claims sweep tests it)
    shown = [k for k in keys if k.startswith("eval/pass_rate/") or k in ("eval/diversity", "eval/defective_patches")]
    fell = [k for k in keys if k != trained and k not in shown and figures[k][2] < -TOLERANCE]
    return figures, trained, fell


def before_after_gif(folder, path):
    """Left: the first evaluation's sample grid (videos only); right: the last one's (with captions)."""
    import imageio.v2 as imageio
    import numpy as np
    samples = sorted((f for f in os.listdir(os.path.join(folder, "samples")) if f.endswith((".mp4", ".gif"))),
                     key=lambda f: int(re.findall(r"\d+", f)[-1]))  # step-000030.mp4 / round-12.mp4
    first, last = (imageio.mimread(os.path.join(folder, "samples", f), memtest=False) for f in (samples[0], samples[-1]))
    video_w = first[0].shape[1] - 300  # save_video_grid: the clips, then a 300 px caption column
    frames = [np.concatenate([a[:, :video_w, :3], np.full((a.shape[0], 8, 3), 255, np.uint8), b[:, :, :3]], 1)
              for a, b in zip(first, last)]
    imageio.mimwrite(path, frames, duration=250, loop=0)
    return path


def main(args):
    results = json.load(open(args.out)) if os.path.exists(args.out) else {}
    for script in args.only:
        folder = os.path.join(args.runs, script)
        seconds = None
        if not args.report and not finished(folder):
            seconds = run(script, folder, args.threads, args.extra)  # (a resumed run: this session's time only)
        rows = evals(folder)
        if not finished(folder):
            print(f"{script}: no finished run in {folder}")
            continue
        config = json.load(open(os.path.join(folder, "config.json")))
        figures, trained, fell = judge(script, rows, config)
        rises = figures[trained][2] > 0
        ran = seconds is not None  # (else the wall time and threads stay those recorded when it ran)
        results[script] = {"command": config.get("command"),
                           "trained": trained, "figures": figures, "fell": fell, "meets_rule": rises and not fell,
                           "threads": args.threads if ran else results.get(script, {}).get("threads"),
                           "seconds": seconds if ran else results.get(script, {}).get("seconds")}
        if not args.no_gif:
            before_after_gif(folder, os.path.join(ROOT, "assets", f"{GIFS[script]}_before_after.gif"))
    for script, r in results.items():
        wall = f", {r['seconds'] / 60:.1f} min with {r['threads']} threads" if r.get("seconds") else ""
        print(f"\n### {script} ({r['command']}{wall})")
        print("| held-out | before | after | change |\n|---|---|---|---|")
        for k, (a, b, c) in r["figures"].items():
            mark = " (trained)" if k == r["trained"] else (" (fell > 0.05)" if k in r["fell"] else "")
            print(f"| {k[5:]}{mark} | {a:.3f} | {b:.3f} | {c:+.3f} |")
        print(f"rule (trained reward rises, no other dimension falls > {TOLERANCE}): "
              + ("MET" if r["meets_rule"] else "NOT met"))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main(p.parse_args())
