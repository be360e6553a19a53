"""Rerun the papers' checkable claims (docs/ALGORITHMS.md) in the toy world, 3 seeds each.

    python benchmarks/claims.py                          # all 9 experiments (~3 h on 2 CPU cores, 3 seeds)
    python benchmarks/claims.py --only online_vs_offline num_candidates
    python benchmarks/claims.py --smoke --out /tmp/c     # 1-2 steps, 1 seed: the plumbing only (CI)

Every experiment is a set of runs of the four scripts through their ordinary command lines (shared
runs are run once: the default OnlineVPO configuration serves five experiments). Runs go to
runs/claims/<config>_s<seed>/ (--runs, not committed); a finished run's figures are kept in <out>/runs/ (--keep,
committed) and the run is skipped from then on (while its flags, seed and base weights stand: a new toy base reruns
it), so an interrupted sweep continues where it stopped, on this machine or a fresh one. Each experiment writes <out>/<name>.json (the claim, every run's figures, per-seed mean and
spread, and whether the claim held) and <name>.png. Figures are changes on HELD-OUT prompts between
step 0 and the end of the run, paired per seed (a seed fixes prompts, candidates and evaluation noise).
The scale is set by what 2 CPU cores can run, not by the papers: 30 steps of 4 prompts (toy model).
"""
import argparse
import concurrent.futures
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--only", nargs="*", default=None, help="experiments to run (default: all); names below")
p.add_argument("--seeds", type=int, default=3, help="seeds per configuration")
p.add_argument("--jobs", type=int, default=2, help="runs in parallel (one CPU thread each)")
p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "claims"), help="where JSON, PNG and runs go")
p.add_argument("--runs", default=os.path.join(ROOT, "runs", "claims"), help="where the runs' folders go (not committed)")
p.add_argument("--keep", default=None, help="where each finished run's figures are kept (default <out>/runs, committed): "
               "a sweep continues from them on a fresh machine")
p.add_argument("--smoke", action="store_true", help="1-2 steps, 1 seed, 4 eval prompts: checks the plumbing, no figures")
p.add_argument("--aggregate-only", action="store_true", help="write JSON/PNG from finished runs, start none")
p.add_argument("--extend-to", type=int, default=5,
               help="seeds to run for an experiment whose 95%% interval spans zero after --seeds (0: never)")
p.add_argument("--rejudge", action="store_true", help="new verdicts and tables from the saved JSONs' per-seed figures")
p.add_argument("--readme", action="store_true", help="rewrite docs/claims.md's claims section (between its markers) from the "
               "saved JSONs, intro.md and <name>.notes.md (the hand-written commentary) in --out")

# ---- configurations: a script and its flags; experiments below name them --------------------
# (rewards and learning rates pinned, so re-tuning a script's toy default does not move the claims. DPO's lr:
# on the step-11000 base, 1e-3 (the previous sweeps') lost the held-out reward on the pilot seed, 3e-4 gained: docs/claims.md)
DPO = {"script": "online_vpo.py", "--reward": "toy:temporal", "--lr": 3e-4, "--steps": 30, "--batch-size": 4,
       "--num-candidates": 4, "--ref-update-interval": 10, "--eval-every": 10, "--save-every": 1000,
       "--recipe": "paper"}  # (the toy default until the toy recipe became it: runs kept from before ran it unnamed)
GRAN = {k: v for k, v in DPO.items() if k != "--recipe"} | {"script": "gran_dpo.py"}  # (gran_dpo: the paper's)
VADER = {"script": "vader_grad.py", "--reward": "toy:temporal", "--lr": 1e-3, "--steps": 60, "--batch-size": 4,
         "--eval-every": 10, "--save-every": 1000}
RWR = {"script": "vlm_feedback_rwr.py", "--lr": 1e-4, "--rounds": 2, "--prompts-per-round": 24,
       "--videos-per-prompt": 4, "--epochs": 2, "--batch-size": 16}
CONFIGS = {
    "dpo": DPO,  # OnlineVPO as the paper runs it (toy scale): online, N = 4, curriculum every 10 steps, temporal
    "dpo_offline": DPO | {"--offline": True},
    "dpo_ref_never": DPO | {"--ref-update-interval": 0},
    "dpo_ref_3": DPO | {"--ref-update-interval": 3},
    "dpo_ref_20": DPO | {"--ref-update-interval": 20},
    "dpo_n2": DPO | {"--num-candidates": 2},
    "dpo_n6": DPO | {"--num-candidates": 6},
    "dpo_n8": DPO | {"--num-candidates": 8},
    "dpo_dynamic": DPO | {"--reward": "toy:dynamic"},
    "dpo_text": DPO | {"--reward": "toy:text"},
    "dpo_quality": DPO | {"--reward": "toy:quality"},
    "dpo_mean": DPO | {"--reward": "toy:mean"},
    "dpo_frame": DPO | {"--reward": "toy:frame"},
    "vader": VADER,
    "gran": GRAN | {"--reward": "toy:quality"},
    "gran_video_only": GRAN | {"--reward": "toy:quality", "--patch-weight": 0},
    "rwr": RWR,
    "rwr_dpo": RWR | {"--loss": "dpo"},
    # "no algorithmically dominant method": one reward (toy:temporal), 480 sampled videos each, held-out prompts
    "grpo_480": {"script": "flow_grpo.py", "--reward": "toy:temporal", "--steps": 30, "--batch-size": 4,
                 "--group-size": 4, "--eval-every": 10, "--save-every": 1000},  # 30 x 4 prompts x G 4
    "vader_480": VADER | {"--steps": 120, "--eval-every": 40},  # 120 x 4 videos
    "rwr_480": RWR | {"--judge": "toy:temporal", "--prompts": "toy_train", "--eval-prompts": "toy_heldout",
                      "--prompts-per-round": 60},  # 2 rounds x 60 prompts x 4: r = the reward itself, w = exp(r / beta)
}
DIMS = ["visual_quality", "temporal_consistency", "dynamic_degree", "text_alignment", "physics", "color_accuracy"]

EXPERIMENTS = {  # name -> (claim, configurations, the figure compared)
    "online_vs_offline": ("online DPO beats offline DPO on the same reward at equal samples (OnlineVPO)",
                          ["dpo", "dpo_offline"], "reward"),
    "ref_interval": ("the reference-update interval I has an interior optimum (OnlineVPO: 200 of 100-600)",
                     ["dpo_ref_never", "dpo_ref_3", "dpo", "dpo_ref_20"], "reward"),
    "num_candidates": ("candidates N: 2 < 4 <= 6 ~ 8, gains flatten from 4 (OnlineVPO)",
                       ["dpo_n2", "dpo", "dpo_n6", "dpo_n8"], "reward"),
    "gradient_vs_dpo": ("reward gradients (VADER) climb fastest per reward query, lower diversity, and over long "
                        "runs hack the reward", ["vader", "dpo"], "reward"),
    "feedback_dimension": ("temporal-consistency feedback raises consistency but LOWERS dynamic degree; the mean of "
                           "all dimensions is worse than the single best dimension (OnlineVPO)",
                           ["dpo", "dpo_dynamic", "dpo_text", "dpo_quality", "dpo_mean"], "dims"),
    "frame_vs_video_reward": ("frame-wise (image) rewards improve image-level metrics far more than temporal ones "
                              "(OnlineVPO)", ["dpo_frame", "dpo"], "dims"),
    "gran_vs_video_dpo": ("Gran-DPO reduces defective patches faster than video-level DPO at equal samples (HALO)",
                          ["gran", "gran_video_only"], "defective_patches"),
    "rwr_vs_dpo": ("binary AI feedback raises the judged pass rate; gains concentrate on falling objects and "
                   "interactions (RWR seed paper); RWR vs DPO side by side", ["rwr", "rwr_dpo"], "pass_rate"),
    "no_dominant_method": ("no algorithm dominates: with the same reward and the same number of sampled videos, "
                           "GRPO, online DPO, reward gradients and RWR differ less than the reward matters (RWR seed "
                           "paper)", ["dpo", "grpo_480", "vader_480", "rwr_480"], "dims"),
}
TITLES = {"online_vs_offline": "Online vs offline DPO at equal samples",
          "ref_interval": "Reference-update interval (never, 3, 10, 20 steps)",
          "num_candidates": "Number of candidates N = 2, 4, 6, 8",
          "gradient_vs_dpo": "Reward gradients (VADER) vs online DPO, same reward",
          "feedback_dimension": "Which feedback dimension to train on",
          "frame_vs_video_reward": "Frame-wise (image) reward vs video reward",
          "gran_vs_video_dpo": "Gran-DPO vs video-level DPO",
          "rwr_vs_dpo": "RWR vs DPO on binary judge feedback",
          "no_dominant_method": "GRPO, online DPO, VADER and RWR: same reward, same number of videos"}


def argv_of(cfg, seed, out, smoke):
    cfg = dict(cfg)
    if smoke:  # the plumbing only: shortest runs that still evaluate, train and write everything
        for k, v in {"--steps": 2, "--eval-every": 1, "--rounds": 1, "--prompts-per-round": 4,
                     "--videos-per-prompt": 2, "--epochs": 1, "--batch-size": 2 if "--rounds" not in cfg else 4}.items():
            if k in cfg:
                cfg[k] = v
        cfg["--num-train-eval-prompts" if "--rounds" in cfg else "--num-eval-prompts"] = 4
        if cfg["script"] in ("online_vpo.py", "gran_dpo.py"):
            cfg["--heldout-pairs"] = 0  # (64 extra videos per run would double the smoke's time)
    argv = [sys.executable, os.path.join(ROOT, cfg.pop("script"))]
    for k, v in cfg.items():
        argv += [k] if v is True else [k, str(v)]
    return argv + ["--seed", str(seed), "--out", out]


def kept(name, seed, args):
    return os.path.join(args.keep, f"{name}_s{seed}")


@functools.lru_cache(maxsize=None)
def base_fingerprint():
    """The first 12 hex digits of the toy base's weights' SHA-256: a new base makes every kept run stale."""
    with open(os.path.join(ROOT, "assets", "toy", "transformer", "diffusion_pytorch_model.safetensors"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:12]


def flags(name, seed, args):
    """What a run was run with (script, flags, seed, base weights; no paths): a kept run counts only while its
    configuration and the base it ran on stand."""
    argv = [os.path.basename(a) for a in argv_of(CONFIGS[name], seed, "", args.smoke)[1:-2]]
    if "--recipe" in argv and argv[argv.index("--recipe") + 1] == "paper":  # (see DPO: kept runs do not name it)
        i = argv.index("--recipe")
        del argv[i: i + 2]
    return argv + [f"base={base_fingerprint()}"]


def finished_in(folder, name, seed, args):
    """The folder holds a finished run of this configuration as it stands now."""
    f = os.path.join(folder, "flags.json")
    return os.path.exists(os.path.join(folder, "done")) and os.path.exists(f) and json.load(open(f)) == flags(name, seed, args)


def is_kept(name, seed, args):
    return finished_in(kept(name, seed, args), name, seed, args)


def keep_run(name, seed, out, args):
    """Copy what the verdicts need out of a finished run: its metrics, configuration and seconds, and for the
    gradient-vs-DPO pair the diversity of its final weights. Small enough to commit, so a sweep split over
    sessions (or machines) continues from them; the heavy run folder may go."""
    dst = kept(name, seed, args)
    shutil.rmtree(dst, ignore_errors=True)
    os.makedirs(dst)
    for f in ("metrics.jsonl", "config.json"):
        shutil.copy(os.path.join(out, f), dst)
    if name in EXPERIMENTS["gradient_vs_dpo"][1] and not args.smoke:
        div = diversity(out, seed)
        with open(os.path.join(dst, "diversity.json"), "w") as f:
            json.dump({"diversity": div}, f)
    with open(os.path.join(dst, "flags.json"), "w") as f:
        json.dump(flags(name, seed, args), f)
    shutil.copy(os.path.join(out, "done"), dst)  # last: a kept folder with `done` is complete


def run_one(name, seed, args):
    out = os.path.join(args.runs, f"{name}_s{seed}")
    if is_kept(name, seed, args):
        return out, 0.0
    t0 = time.time()
    if not finished_in(out, name, seed, args):
        if args.aggregate_only:
            return out, 0.0
        shutil.rmtree(out, ignore_errors=True)  # an interrupted run starts over (it is short)
        os.makedirs(out)
        with open(os.path.join(out, "flags.json"), "w") as f:
            json.dump(flags(name, seed, args), f)
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
        with open(os.path.join(out, "log.txt"), "w") as log:
            rc = subprocess.run(argv_of(CONFIGS[name], seed, out, args.smoke), cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise RuntimeError(f"{name} seed {seed} failed (exit {rc}): see {out}/log.txt")
        open(os.path.join(out, "done"), "w").write(f"{time.time() - t0:.1f}\n")
    keep_run(name, seed, out, args)  # (a run finished but not yet kept is only kept)
    return out, time.time() - t0


def read_run(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [r for r in rows if r.get("eval")], [r for r in rows if not r.get("eval")], json.load(open(os.path.join(out, "config.json")))


def mean_std(xs):
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / max(len(xs) - 1, 1)) ** 0.5


T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def paired_ci(a, b):
    """Mean of the per-seed differences a_i - b_i and its 95% confidence interval (Student's t, n - 1 dof).
    a and b are paired: the same seeds in the same order (a seed fixes prompts, candidates, evaluation videos)."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    m, s = mean_std(diffs)
    half = T975.get(len(diffs) - 1, 1.96) * s / len(diffs) ** 0.5
    return m, m - half, m + half


def verdict(a, b, more_is_better=True):
    """From the paired difference's 95% CI over seeds, taken in the claim's direction (a - b, or b - a when less
    is better): 'held' when the interval lies above 0, 'not held' when below (or exactly 0: no change),
    'inconclusive' when it spans 0."""
    if len(a) < 2:
        return "one seed: no interval to judge by"
    m, lo, hi = paired_ci(a, b) if more_is_better else paired_ci(b, a)
    word = "held" if lo > 0 else "not held" if hi <= 0 else "inconclusive"  # ([0, 0]: no change at all)
    return f"{word} ({m:+.3f}, 95% CI [{lo:+.3f}, {hi:+.3f}], n={len(a)})"


def combined(verdicts, detail):
    """A claim made of parts holds when every part holds, fails when one fails, else is inconclusive."""
    words = [v.split(" (")[0] for v in verdicts]
    if any(w.startswith("one seed") for w in words):
        return "one seed: no interval to judge by"
    word = "held" if all(w == "held" for w in words) else "not held" if "not held" in words else "inconclusive"
    return f"{word}: {detail}"


def diversity(out, seed, n_prompts=4, n_seeds=4):
    """Per-pixel variance across seeds of the same held-out prompt, for a finished run's final weights."""
    import torch
    torch.set_num_threads(1)  # (beside the sweep's other run)
    sys.path.insert(0, ROOT)
    import common
    import models
    cfg = json.load(open(os.path.join(out, "config.json")))
    model = models.load_model(cfg["model"], "cpu")
    params = common.setup_trainable(model, cfg["lora_rank"], cfg["lora_alpha"])
    state = torch.load(os.path.join(common.latest_checkpoint(out), "state.pt"), weights_only=False)
    with torch.no_grad():
        for q, v in zip(params, state["params"]):
            q.copy_(v)
        prompts = common.load_prompts(cfg["eval_prompts"])[:n_prompts]
        _, videos = common.sample(model, [pr for pr in prompts for _ in range(n_seeds)],
                                  [common.seed_for(seed, "div", i, s) for i in range(n_prompts) for s in range(n_seeds)],
                                  cfg["num_frames"], cfg["height"], cfg["width"], cfg["sample_steps"], cfg["guidance"])
    return videos.reshape(n_prompts, n_seeds, -1).var(1).mean().item()


def summarise(name, runs, args):
    """Figures of one experiment from its finished runs: {config: {figure: [per seed]}}, and the verdict."""
    claim, configs, kind = EXPERIMENTS[name]
    figs = {}
    for c in configs:
        per = {}
        for seed, out in runs[c]:
            evals, train, cfg = read_run(out)
            first, last = evals[0], evals[-1]
            if kind == "pass_rate":
                keys = [k for k in last if k.startswith(("eval/pass_rate", "train/pass_rate"))]
                f = {k: last[k] - first.get(k, 0.0) for k in keys}
                f |= {f"{k}@start": first.get(k, 0.0) for k in keys} | {f"{k}@end": last[k] for k in keys}
                f["sec"] = float(open(os.path.join(out, "done")).read())
            else:
                f = {f"delta/{k}": last[f"eval/{k}"] - first[f"eval/{k}"] for k in DIMS + ["reward", "defective_patches"]
                     if f"eval/{k}" in last}
                f |= {f"end/{k}": last[f"eval/{k}"] for k in DIMS + ["reward"] if f"eval/{k}" in last}
                per_query = cfg["batch_size"] * cfg.get("num_candidates", cfg.get("group_size", 1))  # videos per step
                if "eval/reward" in evals[0] or kind == "defective_patches":  # (RWR logs a pass rate)
                    f["curve"] = [(r["step"] * per_query, r["eval/defective_patches" if kind == "defective_patches"
                                                            else "eval/reward"]) for r in evals]
                f["sec"] = float(open(os.path.join(out, "done")).read())
                if name == "gradient_vs_dpo" and not args.smoke:  # (kept for this pair only)
                    f["diversity"] = json.load(open(os.path.join(out, "diversity.json")))["diversity"]
            for k, v in f.items():
                per.setdefault(k, []).append(v)
        figs[c] = per
    stats = {c: {k: mean_std(v) for k, v in per.items() if k != "curve"} for c, per in figs.items()}
    return claim, figs, stats, judge_claim(name, figs)


def judge_claim(name, figs):
    d = lambda c, k="delta/reward": figs[c][k]  # noqa: E731 (per-seed values)
    if name == "online_vs_offline":
        return {"online > offline (held-out reward gain)": verdict(d("dpo"), d("dpo_offline"))}
    if name == "ref_interval":
        # from short to long: 3, 10, 20, never; an interior optimum: the better interior interval beats both ends
        best = max(["dpo", "dpo_ref_20"], key=lambda c: mean_std(d(c))[0])
        ends = [verdict(d(best), d("dpo_ref_3")), verdict(d(best), d("dpo_ref_never"))]
        return {f"interior optimum ({best} beats I=3 and never)": combined(ends, f"vs I=3 {ends[0]}; vs never {ends[1]}"),
                "curriculum (I=10) > fixed reference": verdict(d("dpo"), d("dpo_ref_never")),
                "shortest interval (I=3) > fixed reference": verdict(d("dpo_ref_3"), d("dpo_ref_never"))}
    if name == "num_candidates":
        return {"N=4 > N=2": verdict(d("dpo"), d("dpo_n2")),
                "N=8 > N=4 (gains continue)": verdict(d("dpo_n8"), d("dpo"))}
    if name == "gradient_vs_dpo":
        curves = figs["vader"]["curve"] + figs["dpo"]["curve"]
        q_eq = min([160] + [cv[-1][0] for cv in curves])  # equal reward queries: DPO's first evaluation (10 x 4 x 4)
        at_q = lambda c: [next(r for q, r in cv if q >= q_eq) - cv[0][1] for cv in figs[c]["curve"]]  # noqa: E731
        out = {f"VADER climbs faster per reward query (held-out gain after {q_eq} queries)": verdict(at_q("vader"), at_q("dpo"))}
        if "diversity" in figs["vader"]:
            out["VADER lowers diversity more than DPO"] = verdict(figs["vader"]["diversity"], figs["dpo"]["diversity"], False)
        # hacking: the trained reward rises while what it does not measure (motion, prompt faithfulness) falls
        unmeasured = [a + b for a, b in zip(figs["vader"]["delta/dynamic_degree"], figs["vader"]["delta/text_alignment"])]
        zero = [0.0] * len(unmeasured)
        up, down = verdict(figs["vader"]["delta/reward"], zero), verdict(zero, unmeasured)
        out["VADER hacks: trained reward up, dynamic degree + text alignment down"] = \
            combined([up, down], f"reward up {up}; dynamic degree + text alignment down {down}")
        peak_then_drop = [max(r for _, r in cv) - cv[-1][1] for cv in figs["vader"]["curve"]]
        out["VADER's held-out reward falls back from its peak (by more than 0.01)"] = verdict(peak_then_drop, [0.01] * len(zero))
        return out
    if name == "feedback_dimension":
        best_single = max(["dpo", "dpo_dynamic", "dpo_text", "dpo_quality"],
                          key=lambda c: mean_std([sum(v) for v in zip(*[figs[c][f"delta/{k}"] for k in DIMS[:5]])])[0])
        all_dims = lambda c: [sum(v) for v in zip(*[figs[c][f"delta/{k}"] for k in DIMS[:5]])]  # noqa: E731
        return {"temporal feedback raises consistency": verdict(d("dpo", "delta/temporal_consistency"), [0.0] * len(d("dpo"))),
                "temporal feedback lowers dynamic degree": verdict(d("dpo", "delta/dynamic_degree"), [0.0] * len(d("dpo")), False),
                f"the mean of all dimensions is worse than the best single one ({best_single}) on the sum of "
                "all five dimensions' gains": verdict(all_dims(best_single), all_dims("dpo_mean"))}
    if name == "frame_vs_video_reward":
        img = lambda c: [a + b for a, b in zip(d(c, "delta/visual_quality"), d(c, "delta/color_accuracy"))]  # noqa: E731
        tmp = lambda c: [a + b for a, b in zip(d(c, "delta/temporal_consistency"), d(c, "delta/physics"))]  # noqa: E731
        return {"frame-wise reward: image-level gain (quality + colour accuracy) > temporal gain (consistency + physics)":
                verdict(img("dpo_frame"), tmp("dpo_frame")),
                "video reward moves temporal metrics more than the frame-wise reward": verdict(tmp("dpo"), tmp("dpo_frame"))}
    if name == "gran_vs_video_dpo":
        return {"Gran-DPO removes more defective patches": verdict(d("gran", "delta/defective_patches"),
                                                                   d("gran_video_only", "delta/defective_patches"), False)}
    if name == "no_dominant_method":  # the trained dimension (toy:temporal = temporal consistency), every pair
        names = {"dpo": "online DPO", "grpo_480": "GRPO", "vader_480": "VADER", "rwr_480": "RWR"}
        out, beaten = {}, {c: 0 for c in names}
        for i, a in enumerate(names):
            for b in list(names)[i + 1:]:
                v = verdict(d(a, "delta/temporal_consistency"), d(b, "delta/temporal_consistency"))
                out[f"{names[a]} vs {names[b]}: trained reward gain, {names[a]} minus {names[b]}"] = v
                beaten[a if v.startswith("held") else b] += v.startswith(("held", "not held"))
        top = [c for c, n in beaten.items() if n == len(names) - 1]
        out["no method beats all three others"] = "one seed: no interval to judge by" if len(
            d("dpo", "delta/temporal_consistency")) < 2 else \
            f"not held: {names[top[0]]} beats every other" if top else "held: no method's gain is above every other's"
        return out
    if name == "rwr_vs_dpo":
        zero = [0.0] * len(figs["rwr"]["eval/pass_rate"])
        return {"RWR raises the held-out pass rate": verdict(figs["rwr"]["eval/pass_rate"], zero),
                "DPO raises the held-out pass rate": verdict(figs["rwr_dpo"]["eval/pass_rate"], zero)}
    raise KeyError(name)


def plot(name, figs, stats, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    configs = list(figs)
    if EXPERIMENTS[name][2] in ("reward", "defective_patches") and all("curve" in figs[c] for c in configs):
        fig, ax = plt.subplots(figsize=(6, 4))
        for c in configs:
            for i, cv in enumerate(figs[c]["curve"]):
                ax.plot(*zip(*cv), color=f"C{configs.index(c)}", alpha=0.8, label=c if i == 0 else None)
        ax.set_xlabel("reward queries (videos scored)")
        ax.set_ylabel("defective patches per held-out video" if EXPERIMENTS[name][2] == "defective_patches"
                      else "held-out trained reward")
    else:
        keys = sorted({k for c in configs for k in stats[c] if k.startswith(("delta/", "eval/pass_rate")) and "@" not in k})
        fig, ax = plt.subplots(figsize=(max(6, len(keys) * 1.2), 4))
        w = 0.8 / len(configs)
        for j, c in enumerate(configs):
            ax.bar([i + j * w for i in range(len(keys))], [stats[c].get(k, (0, 0))[0] for k in keys], w,
                   yerr=[stats[c].get(k, (0, 0))[1] for k in keys], label=c)
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(keys))], [k.split("/", 1)[1] for k in keys], rotation=30, ha="right")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_ylabel("change from step 0 (mean over seeds, bar = std)")
    ax.set_title(name)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(name, save):
    """The experiment as a docs/claims.md section: claim, command, a mean ± std table per configuration, verdicts."""
    stats, n = save["mean_std"], len(save["seeds"])
    keys = [k for k in next(iter(stats.values())) if k.startswith(("delta/", "eval/pass_rate", "diversity"))
            and "@" not in k and k != "delta/reward"]
    if EXPERIMENTS[name][2] == "pass_rate":  # the level at the start, then the changes
        keys = ["eval/pass_rate@start"] + [k for k in keys if k.startswith("eval/")]
    head = ["configuration"] + (["trained reward"] if EXPERIMENTS[name][2] != "pass_rate" else []) + \
        [k.split("/", 1)[1] if k.startswith("delta/") else k.replace("eval/pass_rate", "held-out pass rate").replace(
            "@start", " at start").replace("diversity", "diversity at end") for k in keys] + ["s/run"]
    lines = [f"**Claim** ({EXPERIMENTS[name][0]}). `{save['command']}`, {n} seed{'s' * (n > 1)}; "
             "change from step 0 to the end on held-out prompts, mean ± std over seeds.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c, st in stats.items():
        cells = [f"`{c}`"] + ([(f"{st['delta/reward'][0]:+.3f} ± {st['delta/reward'][1]:.3f}" if "delta/reward" in st
                                else "-")] if "trained reward" in head else [])  # (RWR: its judge's, not a reward)
        cells += [(f"{st[k][0]:.4f} ± {st[k][1]:.4f}" if k == "diversity" else f"{st[k][0]:+.3f} ± {st[k][1]:.3f}")
                  if k in st else "" for k in keys]
        cells += [f"{st['sec'][0]:.0f}" if "sec" in st else ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [""] + [f"- {k}: **{v}**" for k, v in save["verdict"].items()]
    return "\n".join(lines) + "\n"


def run_all(jobs, args):
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(run_one, c, s, args): (c, s) for c, s in jobs}  # (--aggregate-only: keep, run none)
        for fut in concurrent.futures.as_completed(futures):
            c, s = futures[fut]
            out, sec = fut.result()
            print(f"{c} seed {s}: {'done' if sec else 'already done'} ({sec:.0f} s)", flush=True)


def finished_runs(configs, args):
    """{config: [(seed, kept folder)]} over the seeds EVERY one of `configs` has finished: the pairing."""
    done = {c: {s for s in range(100) if is_kept(c, s, args)} for c in configs}
    seeds = sorted(set.intersection(*done.values()))
    return {c: [(s, kept(c, s, args)) for s in seeds] for c in configs}


def write_experiment(n, claim, figs, stats, held, seeds, args):
    save = {"experiment": n, "claim": claim, "command": f"python benchmarks/claims.py --only {n}", "seeds": seeds,
            "configs": {c: {k: v for k, v in CONFIGS[c].items()} for c in figs}, "verdict": held,
            "mean_std": {c: {k: list(v) for k, v in st.items()} for c, st in stats.items()}, "per_seed": figs}
    with open(os.path.join(args.out, f"{n}.json"), "w") as f:
        json.dump(save, f, indent=1)
    plot(n, figs, stats, os.path.join(args.out, f"{n}.png"))
    with open(os.path.join(args.out, f"{n}.md"), "w") as f:
        f.write(markdown(n, save))
    print(f"\n## {n}: {claim}")
    for c, st in stats.items():
        shown = {k: f"{m:+.3f}±{s:.3f}" for k, (m, s) in st.items() if k.startswith(("delta/", "eval/pass_rate", "diversity"))
                 and "@" not in k}
        print(f"  {c}: {shown}")
    for k, v in held.items():
        print(f"  -> {k}: {v}")


def readme(args, path=os.path.join(ROOT, "docs", "claims.md")):
    """docs/claims.md's claims section, between its markers: intro.md, the table of every verdict, then per experiment
    its table (<name>.md, written by the sweep), the commentary (<name>.notes.md, by hand) and its plot, linked
    relative to the page (`path`)."""
    read = lambda f: open(os.path.join(args.out, f)).read().strip() + "\n"  # noqa: E731
    plots = os.path.relpath(os.path.abspath(args.out), os.path.dirname(os.path.abspath(path))).replace(os.sep, "/")
    parts = ["## The papers' claims in the toy world (`python benchmarks/claims.py`)\n", read("intro.md"),
             "| experiment | claim | verdict (paired difference, 95% CI over seeds) |", "|---|---|---|"]
    ran = lambda n: os.path.exists(os.path.join(args.out, f"{n}.json"))  # noqa: E731
    for i, n in enumerate(EXPERIMENTS, 1):
        if not ran(n):  # (an experiment added since the sweep: listed, not yet run)
            parts.append(f"| {i}. {n} | {EXPERIMENTS[n][0]} | not run yet: `python benchmarks/claims.py --only {n}` |")
            continue
        for k, v in json.load(open(os.path.join(args.out, f"{n}.json")))["verdict"].items():
            parts.append(f"| {i}. {n} | {k} | {v} |")
    parts.append("")
    for i, n in enumerate(EXPERIMENTS, 1):
        if not ran(n):
            continue
        notes = os.path.join(args.out, f"{n}.notes.md")
        parts += [f"### {i}. {TITLES[n]}\n", read(f"{n}.md")] + ([read(f"{n}.notes.md")] if os.path.exists(notes) else []) \
            + [f"![{n}]({plots}/{n}.png)\n"]
    text = open(path).read()
    start, end = text.index("<!-- claims:start -->\n") + len("<!-- claims:start -->\n"), text.index("<!-- claims:end -->")
    with open(path, "w") as f:
        f.write(text[:start] + "\n".join(parts) + "\n" + text[end:])


def main(args):
    names = args.only or list(EXPERIMENTS)
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise SystemExit(f"unknown experiment(s) {unknown}: valid are {list(EXPERIMENTS)}")
    if args.readme:
        return readme(args)
    if args.rejudge:  # new verdicts from the per-seed figures already saved, no run needed
        for n in names:
            save = json.load(open(os.path.join(args.out, f"{n}.json")))
            figs = save["per_seed"]
            stats = {c: {k: mean_std(v) for k, v in per.items() if k != "curve"} for c, per in figs.items()}
            write_experiment(n, save["claim"], figs, stats, judge_claim(n, figs), save["seeds"], args)
        return
    seeds = list(range(1 if args.smoke else args.seeds))
    needed = sorted({c for n in names for c in EXPERIMENTS[n][1]})
    # seed 0 of every configuration first (a first figure for every claim), then the other seeds of the
    # configurations the central claims rest on, then the rest: an interrupted sweep still says the most
    core = [c for c in needed if c in ("dpo", "dpo_offline", "vader", "gran", "gran_video_only", "rwr", "rwr_dpo")]
    run_all([(c, seeds[0]) for c in needed] + [(c, s) for s in seeds[1:] for c in core] +
            [(c, s) for s in seeds[1:] for c in needed if c not in core], args)
    for rnd in range(2):
        extend = []
        for n in names:
            runs = finished_runs(EXPERIMENTS[n][1], args)
            if not runs[EXPERIMENTS[n][1][0]]:
                print(f"{n}: runs missing, skipped")
                continue
            claim, figs, stats, held = summarise(n, runs, args)
            write_experiment(n, claim, figs, stats, held, [s for s, _ in runs[EXPERIMENTS[n][1][0]]], args)
            if rnd == 0 and not args.smoke and args.extend_to > len(seeds) and any(v.startswith("inconclusive") for v in held.values()):
                extend += [(c, s) for s in range(len(seeds), args.extend_to) for c in EXPERIMENTS[n][1]]
        if not extend:
            break
        print(f"\nintervals across zero: seeds {len(seeds)}..{args.extend_to - 1} for {sorted({c for c, _ in extend})}")
        run_all(list(dict.fromkeys(extend)), args)


if __name__ == "__main__":
    a = p.parse_args()
    if a.smoke and a.out == p.get_default("out"):
        raise SystemExit("--smoke makes plumbing runs, not figures: give it its own --out (e.g. --out /tmp/claims), "
                         "so they are not kept beside the sweep's results")
    a.keep = a.keep or os.path.join(a.out, "runs")
    os.makedirs(a.out, exist_ok=True)
    main(a)
