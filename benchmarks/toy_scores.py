"""The toy base model's scores next to ground-truth renders (the ceiling), on train and held-out prompts.

    python benchmarks/toy_scores.py                    # ~2 minutes on 2 CPU cores
Prints a Markdown table (every toy reward dimension, colour accuracy, the judge's pass rate on all
prompts and on the dynamics prompts, i.e. all but "staying still", which RWR trains on; and what the latter would
be if the judge also checked the shape its question names), the judge's pass rate
per category, and the sampling time per video; writes benchmarks/results/toy_scores.json.
"""
import argparse
import json
import os
import random
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import toy_world  # noqa: E402
import models

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--model", default="toy", help="model to score")
p.add_argument("--num-train", type=int, default=96, help="train prompts scored (random subset)")
p.add_argument("--seeds", type=int, default=2, help="videos per prompt")
p.add_argument("--sample-steps", type=int, default=10, help="sampler steps")
p.add_argument("--guidance", type=float, default=3.0, help="CFG scale")
p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "toy_scores.json"), help="JSON output")


def score(videos, prompts):
    r, judge = toy_world.ToyReward(), toy_world.ToyJudge()
    dims = r(videos, prompts)
    s = {k: v.mean().item() for k, v in dims.items() if k != "reward"}
    s["color_accuracy"] = r.color_accuracy(videos, prompts).mean().item()
    yes = judge(videos, prompts)["yes"]
    s["judge_pass_rate"] = yes.mean().item()
    motions = [toy_world.parse_prompt(p)["motion"] for p in prompts]
    dynamics = torch.tensor([m != "staying still" for m in motions])
    s["judge_pass_rate_dynamics"] = yes[dynamics].mean().item()
    # what the pass rate would be if the judge also checked the (first) object's shape, which its question names
    # ("Does the red square ..."); the shipped judge checks motion, physics and colour only
    s["judge_pass_rate_dynamics_if_shape_checked"] = (yes * (dims["shape"] > 0.5))[dynamics].mean().item()
    for cat in sorted(set(toy_world.CATEGORY.values())):  # moving, falling (and bouncing), still, interaction
        s[f"judge_{cat}"] = yes[torch.tensor([toy_world.CATEGORY[m] == cat for m in motions])].mean().item()
    return s


def main(args):
    model = models.load_model(args.model)
    splits = {"train": random.Random(0).sample(toy_world.TRAIN_PROMPTS, args.num_train),
              "held-out": toy_world.HELDOUT_PROMPTS}
    results, sample_seconds = {}, []
    for split, plist in splits.items():
        prompts = [pr for pr in plist for _ in range(args.seeds)]
        vids = []
        with torch.no_grad():
            for c in range(0, len(prompts), 32):
                chunk = prompts[c: c + 32]
                t0 = time.perf_counter()
                vids.append(common.sample(model, chunk, [common.seed_for("score", c + i) for i in range(len(chunk))], 8,
                                          32, 32, args.sample_steps, args.guidance)[1])
                sample_seconds.append((time.perf_counter() - t0) / len(chunk))
        videos = torch.cat(vids)
        results[f"base / {split}"] = score(videos, prompts)
        results[f"ground truth / {split}"] = score(toy_world.render(prompts, seed=1), prompts)
        if split == "held-out":
            gif = (os.path.join(ROOT, "assets", "toy_base_heldout.gif") if args.model == "toy" else  # (a candidate's
                   os.path.splitext(args.out)[0] + "_heldout.gif")  # samples go beside its JSON, not over the shipped ones)
            common.save_video_grid(gif, videos[: 2 * 8: 2], prompts[: 2 * 8: 2])
    keys = ["visual_quality", "temporal_consistency", "dynamic_degree", "text_alignment", "physics", "color", "shape",
            "motion", "color_accuracy", "judge_pass_rate", "judge_pass_rate_dynamics", "judge_pass_rate_dynamics_if_shape_checked"]
    print("| videos | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for name, s in results.items():
        print(f"| {name} | " + " | ".join(f"{s[k]:.3f}" for k in keys) + " |")
    cats = ["moving", "falling", "interaction", "still"]
    print("\njudge pass rate per category (falling includes bouncing):")
    print("| videos | " + " | ".join(cats) + " |")
    print("|---|" + "---|" * len(cats))
    for name, s in results.items():
        print(f"| {name} | " + " | ".join(f"{s['judge_' + c]:.3f}" for c in cats) + " |")
    results["sample_seconds_per_video"] = sorted(sample_seconds)[len(sample_seconds) // 2]  # median over chunks
    print(f"\nsampling: {results['sample_seconds_per_video']:.4f} s per video ({args.sample_steps} steps, CFG "
          f"{args.guidance}, median over chunks of 32, {torch.get_num_threads()} threads)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main(p.parse_args())
