"""Does online DPO's gradient point somewhere? Cross-pair agreement of per-pair DPO gradients on the toy model.

    python benchmarks/dpo_gradient_signal.py                 # ~5 min on 2 CPU cores
    python benchmarks/dpo_gradient_signal.py --smoke         # seconds: the plumbing only

At the start of training (policy = reference) each pair's Diffusion-DPO gradient is
    g_pair = -beta/2 * sigmoid(0) * grad[(e_w - e_l)]   (averaged over K (t, eps) draws shared by w and l).
A batch of pairs can only move the model consistently if different pairs' gradients share a direction. For
each way of making pairs (independent candidates, or aligned ones that branch at sampler step b) and each
timestep density, this prints
  - same-pair cosine: cosine between two independent K/2-draw estimates of ONE pair's gradient (how much of
    a pair's gradient is its (t, eps) draw rather than the pair),
  - cross-pair cosine: mean cosine between the (K-draw) gradients of DIFFERENT pairs (> 0: a common
    preference direction; ~0: each pair pulls its own way),
  - batch agreement: cosine between two batch gradients built from disjoint halves of the pairs (what an
    update sees),
  - margin: mean reward gap of the pairs, and the share of it in motion / shape / colour.
Writes runs/dpo_gradient_signal.json (--out).
"""
import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import rewards  # noqa: E402
import toy_world  # noqa: E402
import models

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--prompts", type=int, default=24, help="training prompts (one pair each)")
p.add_argument("--num-candidates", type=int, default=4, help="N candidates per prompt; the pair is best vs worst")
p.add_argument("--distinct-prompts", type=int, default=None, help="draw the pairs' prompts from only this many prompts (same-prompt pairs: does a preference transfer within a prompt?)")
p.add_argument("--draws", type=int, default=8, help="K (t, eps) draws per pair gradient")
p.add_argument("--branch", default="none,1,2,4", help="pair constructions: none (independent) or a branch step")
p.add_argument("--timesteps", default="uniform,logit-normal", help="training timestep densities")
p.add_argument("--reward", default="toy:text", help="the reward that ranks the candidates")
p.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (its gradients are the ones compared)")
p.add_argument("--seed", type=int, default=0, help="seed of prompts, candidates and draws")
p.add_argument("--threads", type=int, default=2, help="CPU threads")
p.add_argument("--out", default=os.path.join(ROOT, "runs", "dpo_gradient_signal.json"), help="where the JSON goes")
p.add_argument("--smoke", action="store_true", help="4 prompts, 2 draws, one construction: the plumbing only")


def cosine(a, b):
    return (a @ b / (a.norm() * b.norm() + 1e-30)).item()


def main(args):
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.prompts, args.draws, args.branch, args.timesteps = 4, 2, "none,1", "uniform"
    model = models.load_model("toy")
    reward = rewards.load_reward(args.reward, "cpu", torch.float32)
    parts = toy_world.ToyReward()
    params = common.setup_trainable(model, args.lora_rank)
    train = common.load_prompts("toy_train")
    g = torch.Generator().manual_seed(args.seed)
    prompts = [train[i] for i in torch.randint(len(train), (args.prompts,), generator=g).tolist()]
    if args.distinct_prompts:  # e.g. 2: 8 pairs of each of two prompts, each pair from its own candidates
        prompts = [prompts[i % args.distinct_prompts] for i in range(args.prompts)]
    N, results = args.num_candidates, []
    for branch in args.branch.split(","):
        b = None if branch == "none" else int(branch)
        seeds = [common.seed_for(args.seed, i, j) for i in range(len(prompts)) for j in range(N)]
        kw = {}
        if b is not None:
            kw = {"branch_at": b, "branch_seeds": seeds}
            seeds = [common.seed_for(args.seed, i) for i in range(len(prompts)) for j in range(N)]
        allp = [pr for pr in prompts for _ in range(N)]
        lat, vids = [], []
        for c in range(0, len(allp), 16):
            x, v = common.sample(model, allp[c:c + 16], seeds[c:c + 16], 8, 32, 32, 10, 3.0,
                                 **({"branch_at": b, "branch_seeds": kw["branch_seeds"][c:c + 16]} if kw else {}))
            lat.append(x)
            vids.append(v)
        lat, vids = torch.cat(lat), torch.cat(vids)
        with torch.no_grad():
            r = reward(vids, allp)["reward"].view(-1, N)
            dims = parts(vids, allp)
        w, l = r.argmax(1), r.argmin(1)
        rows = torch.arange(len(prompts))
        lat = lat.view(len(prompts), N, *lat.shape[1:])
        x0_w, x0_l = lat[rows, w], lat[rows, l]
        gap = {k: (dims[k].view(-1, N)[rows, w] - dims[k].view(-1, N)[rows, l]).mean().item()
               for k in ("color", "shape", "motion")}
        pix = (x0_w - x0_l).pow(2).mean().item()
        emb, mask = model.encode_prompts(prompts)
        for dist in args.timesteps.split(","):
            grads, within = [], []
            for i in range(len(prompts)):  # one pair at a time: its K-draw gradient of (e_w - e_l)
                halves = []
                for k in range(args.draws):
                    gk = torch.Generator().manual_seed(common.seed_for(args.seed, "draw", i, k))
                    t = common.sample_train_timesteps(model, 1, gk, dist).repeat(2)
                    eps = torch.randn(x0_w.shape[1:], generator=gk).expand(2, *x0_w.shape[1:])
                    x_t, target = common.noisy_and_target(model, torch.stack([x0_w[i], x0_l[i]]), eps, t)
                    err = common.per_sample_mse(model.denoise(x_t, t, emb[i:i + 1].expand(2, *emb.shape[1:]),
                                                              None if mask is None else mask[i:i + 1].expand(2, -1)),
                                                target)
                    ((err[0] - err[1]) / args.draws).backward()
                    if k + 1 in (args.draws // 2, args.draws):  # the gradient of the first half of the draws, then all
                        halves.append(-torch.cat([q.grad.flatten() for q in params]))  # descent direction of e_w - e_l
                grads.append(halves[-1])
                within.append(cosine(halves[0], halves[1] - halves[0]))  # two independent half-K estimates
                for q in params:
                    q.grad = None
            G = torch.stack(grads)
            Gn = G / G.norm(dim=1, keepdim=True)
            C = Gn @ Gn.T
            n = len(grads)
            cross = ((C.sum() - C.diag().sum()) / (n * (n - 1))).item()
            same = torch.tensor([[a == b for b in prompts] for a in prompts]) & ~torch.eye(n, dtype=torch.bool)
            cross_same = C[same].mean().item() if same.any() else float("nan")  # pairs of the SAME prompt
            half = cosine(G[: n // 2].sum(0), G[n // 2:].sum(0))
            reliability = sum(within) / n  # cosine of two K/2-draw estimates of the SAME pair's gradient
            row = {"pairs": "independent" if b is None else f"branch at {b}", "timesteps": dist, "draws": args.draws,
                   "cross_pair_cosine": cross, "same_prompt_cosine": cross_same, "batch_agreement": half, "within_pair_cosine": reliability, "margin": (r[rows, w] - r[rows, l]).mean().item(),
                   "gap": gap, "pixel_mse_w_l": pix}
            results.append(row)
            print(f"{row['pairs']:>14} | {dist:>12} | K {args.draws} | same pair, two K/2 estimates cos {reliability:+.3f} | "
                  f"cross-pair cos {cross:+.3f} (same prompt {cross_same:+.3f}) | halves cos {half:+.3f} | margin "
                  f"{row['margin']:.3f} (colour {gap['color']:+.3f}, shape {gap['shape']:+.3f}, motion "
                  f"{gap['motion']:+.3f}) | pixel MSE w-l {pix:.3f}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    json.dump({"args": vars(args), "results": results}, open(args.out, "w"), indent=1)
    return results


if __name__ == "__main__":
    main(p.parse_args())
