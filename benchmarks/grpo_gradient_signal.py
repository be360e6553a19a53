"""Does GRPO's gradient point somewhere on the toy model? Agreement of batch gradients from independent rollouts.

    python benchmarks/grpo_gradient_signal.py                 # ~5 min on 2 CPU cores
    python benchmarks/grpo_gradient_signal.py --smoke         # seconds: the plumbing only

For one batch of prompts, flow_grpo.py's first update (ratio 1) has the gradient
    g = -1/n sum_videos A_i sum_{trained steps} grad log p(x_{i+1} | x_i),    A: group-relative advantages.
This samples the SAME prompts `--rollouts` times with fresh seeds and prints the cosine between every two of
those batch gradients (what an update sees: > 0, a direction the rollouts agree on; ~0, each batch pulls its own
way), and the mean within-group reward std, once with one initial noise per video (Flow-GRPO) and once with one
per group (--same-noise, DanceGRPO). Writes runs/grpo_gradient_signal.json (--out).
"""
import argparse
import itertools
import json
import os
import random
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import flow_grpo  # noqa: E402
import models  # noqa: E402
import rewards  # noqa: E402
from dpo_gradient_signal import cosine  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--prompts", type=int, default=8, help="training prompts per batch (as flow_grpo.py's default)")
p.add_argument("--group-size", type=int, default=4, help="G: videos per prompt")
p.add_argument("--rollouts", type=int, default=3, help="independent rollouts of the same prompts compared")
p.add_argument("--reward", default="toy:text", help="the reward")
p.add_argument("--seed", type=int, default=0, help="seed of the prompts and the LoRA")
p.add_argument("--threads", type=int, default=2, help="CPU threads")
p.add_argument("--out", default=os.path.join(ROOT, "runs", "grpo_gradient_signal.json"), help="where the JSON goes")
p.add_argument("--smoke", action="store_true", help="2 prompts, G 2, 2 rollouts, 3 sampler steps: the plumbing only")


def batch_gradient(model, reward, params, prompts, G, base_seed, same_noise, kw, window, chunk=16):
    """flow_grpo.py's first-update gradient (as its loop computes it, without the KL term) for one rollout."""
    videos_prompts = [q for q in prompts for _ in range(G)]
    seeds = [common.seed_for(base_seed, i, j) for i in range(len(prompts)) for j in range(G)]
    init = [common.seed_for(base_seed, i) for i in range(len(prompts)) for _ in range(G)]
    parts, scores = [], []
    for c in range(0, len(seeds), chunk):
        part = flow_grpo.sde_sample(model, videos_prompts[c: c + chunk], seeds[c: c + chunk], kw, window, 0.7,
                                    init_seeds=init[c: c + chunk] if same_noise else None)
        scores.append(reward(part.pop("videos"), videos_prompts[c: c + chunk])["reward"].float())
        parts.append(part)
    r = torch.cat(scores).view(len(prompts), G)
    adv = flow_grpo.group_advantages(r, 5.0)[0].flatten()
    x, x_next = (torch.cat([q[k] for q in parts]) for k in ("x", "x_next"))
    for q in params:
        q.grad = None
    for c in range(0, len(seeds), chunk):
        emb, mask = model.encode_prompts(videos_prompts[c: c + chunk])
        nemb, nmask = model.encode_prompts([""] * len(videos_prompts[c: c + chunk]))
        for w, i in enumerate(window):
            logp = flow_grpo.transition(model, x[c: c + chunk, w], x_next[c: c + chunk, w], i, parts[0]["timesteps"],
                                        parts[0]["sigmas"], 0.7, emb, mask, nemb, nmask, kw["guidance"])[0]
            (-(adv[c: c + chunk] * logp).sum() / len(seeds)).backward()
    return torch.cat([q.grad.flatten() for q in params]).clone(), r.std(1, unbiased=False).mean().item()


def main(args):
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.prompts, args.group_size, args.rollouts = 2, 2, 2
    run = flow_grpo.p.parse_args(["--sample-steps", "3"] if args.smoke else [])
    path, family = models.resolve_model("toy")
    flow_grpo.resolve_defaults(run, family)
    models.fill_video_args(run, path, family)
    kw = dict(num_frames=run.num_frames, height=run.height, width=run.width, steps=run.sample_steps,
              guidance=run.guidance)
    window = flow_grpo.parse_window(run.sde_window, run.sample_steps)
    model = models.load_model("toy", "cpu", torch.float32)
    reward = rewards.load_reward(args.reward, "cpu", torch.float32)
    torch.manual_seed(args.seed)
    params = common.setup_trainable(model, 16)
    rng = random.Random(args.seed)
    prompts = [rng.choice(common.load_prompts("toy_train")) for _ in range(args.prompts)]
    results = []
    for same in (False, True):
        grads = [batch_gradient(model, reward, params, prompts, args.group_size, 1000 + k, same, kw, window)
                 for k in range(args.rollouts)]
        cos = [cosine(a, b) for (a, _), (b, _) in itertools.combinations(grads, 2)]
        row = {"initial_noise": "one per group" if same else "one per video", "cosines": cos,
               "mean_cosine": sum(cos) / len(cos), "group_reward_std": sum(s for _, s in grads) / len(grads)}
        results.append(row)
        print(f"{row['initial_noise']:>13} | batch-gradient cosines {' '.join(f'{c:+.3f}' for c in cos)} "
              f"(mean {row['mean_cosine']:+.3f}) | within-group reward std {row['group_reward_std']:.4f}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    json.dump({"args": vars(args), "results": results}, open(args.out, "w"), indent=1)
    return results


if __name__ == "__main__":
    main(p.parse_args())
