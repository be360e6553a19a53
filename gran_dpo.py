"""Gran-DPO (HALO): Diffusion-DPO on the whole video AND on its patches, with patch-level rewards.

Paper: "HALO: Human-Aligned End-to-end Image Generation ... / Harnessing Local reward feedback for
video" (arXiv 2502.06812). HALO scores local spatio-temporal patches with the same reward model as
the whole video and optimises a granular DPO objective. ITS EXACT LOSS WAS NOT AVAILABLE TO US: what
follows is our reconstruction (docs/ALGORITHMS.md), kept in one function (`patch_dpo_loss`) so it is easy
to change. Per patch p with latent mask M_p, the winner is whichever pair member has the higher
PATCH reward there (s_p = +1 if it agrees with the video-level order, -1 if not):
    e_p       = mean over M_p of (f_theta - target)^2              (same for ref)
    inside_p  = -beta_p/2 * s_p * [(e_p_w - e_p_w_ref) - (e_p_l - e_p_l_ref)]
    L         = L_DPO_video + lambda * mean_p( -log sigmoid(inside_p) )
Pairs come online, as in online_vpo.py (best vs worst of N candidates, curriculum reference).
`--patch-weight 0` is exactly video-level online DPO. Levers beyond the paper, off by default, as in
online_vpo.py (docs/dpo_levers.md): `--branch-at`, `--dpo-draws`, `--dpo-epochs`, `--timestep-sampling`;
for measurement, `--eval-seeds` and the implicit accuracy on fresh held-out pairs (`--heldout-pairs`).

    python gran_dpo.py                                         # toy model, CPU, ~10 minutes
    torchrun --nproc_per_node 8 gran_dpo.py --model wan2.1-1.3b --reward videoscore --prompts p.txt
"""
import argparse
import json
import os
import random
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
import distributed
import models
import rewards
import toy_world

p = argparse.ArgumentParser(description="Gran-DPO (HALO): video- and patch-level Diffusion-DPO",
                            formatter_class=common.HelpFormatter)
p.add_argument("--model", default="toy",
               help="'toy', an alias (wan2.1-1.3b, cogvideox-2b, ...), a diffusers folder or hub id")
p.add_argument("--reward", default=None,
               help="reward spec (must offer patch scores); default toy:quality on the toy model, "
                    "videoscore:visual_quality otherwise")
p.add_argument("--prompts", default="toy_train",
               help=f"training prompts: a text file (UTF-8, one per line) or a built-in list: {common.prompt_lists()}")
p.add_argument("--eval-prompts", default="toy_heldout",
               help="HELD-OUT evaluation prompts: a text file or a built-in list (as --prompts)")
p.add_argument("--steps", type=int, default=60, help="optimisation steps")
p.add_argument("--batch-size", type=int, default=8, help="prompts per step, summed over all ranks (paper: 8)")
p.add_argument("--num-candidates", type=int, default=4, help="videos sampled per prompt, N (paper: 4-6)")
p.add_argument("--min-margin", type=float, default=0.02,
               help="skip pairs whose reward margin (best - worst) is below this")
p.add_argument("--beta", type=float, default=None,
               help="DPO beta on mean-reduced errors; default 100 for flow models (Flow-GRPO), 5000 for eps/v "
                    "(Diffusion-DPO)")
p.add_argument("--lr", type=float, default=None,
               help="AdamW learning rate; default 1e-4 with LoRA or on the toy model, 1e-5 for a full fine-tune "
                    "(paper; docs/flags.md)")
p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping")
p.add_argument("--ref-update-interval", type=int, default=None,
               help="curriculum: ref <- policy every I steps (0 = never); default 20 on the toy model, 200 otherwise "
                    "(paper)")
p.add_argument("--sample-batch-size", type=int, default=8,
               help="videos per sampler/decoder call (results do not depend on it; lower it if sampling runs out of "
                    "memory)")
p.add_argument("--branch-at", type=int, default=None,
               help="aligned candidates: one initial noise per prompt, own noise after this sampler step (SDEdit "
                    "branch; flow models); default: independent samples (paper)")
p.add_argument("--dpo-draws", type=int, default=1,
               help="K (t, eps) draws per pair per update, the loss averaged over them (paper: 1)")
p.add_argument("--dpo-epochs", type=int, default=1,
               help="updates on each sampled batch of pairs, each with fresh draws (paper: 1)")
p.add_argument("--timestep-sampling", default="uniform", choices=["uniform", "logit-normal"],
               help="training timestep density (before the flow shift)")
p.add_argument("--patch-grid", default="2,4,4",
               help="patches per video: frame groups, rows, columns (on the latent grid)")
p.add_argument("--patch-weight", type=float, default=1.0,
               help="lambda, the weight of the patch term (0 = video-level DPO only)")
p.add_argument("--patch-beta", type=float, default=None, help="beta_p of the patch term (default: = --beta)")
p.add_argument("--gap-weighting", action="store_true",
               help="weight patches by their reward gap |r_p_w - r_p_l| (normalised to mean 1 over all ranks' pairs)")
p.add_argument("--defect-threshold", type=float, default=0.9,
               help="evaluation: a patch scoring below this counts as defective")
p.add_argument("--lora-rank", type=int, default=16, help="LoRA rank on attention projections (0 = full fine-tune)")
p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: = rank)")
p.add_argument("--num-frames", type=int, default=None, help="frames per video (default: the model's)")
p.add_argument("--height", type=int, default=None, help="video height (default: the model's)")
p.add_argument("--width", type=int, default=None, help="video width (default: the model's)")
p.add_argument("--sample-steps", type=int, default=None,
               help="sampler steps (default: 10 on the toy model, 30 otherwise)")
p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the model's)")
p.add_argument("--guidance-2", type=float, default=None,
               help="Wan 2.2 A14B: guidance of the low-noise expert (default: the model's, 3.0; else --guidance)")
p.add_argument("--fps", type=float, default=None,
               help="frame rate of the generated clips, for rewards that sample by time (VideoScore2, VideoReward, "
                    "Qwen3-VL); default: the model's (Wan 16, CogVideoX 8, LTX 25)")
p.add_argument("--grad-checkpointing", action="store_true",
               help="gradient checkpointing in the denoiser (saves memory)")
p.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"],
               help="autocast dtype; frozen weights (text encoder, VAE, base denoiser, reward) are stored in it, "
                    "trainable ones stay fp32 (fp16 adds dynamic loss scaling)")
p.add_argument("--fsdp", action="store_true",
               help="shard the denoiser with PyTorch FSDP2 over the torchrun ranks (for full fine-tunes and models of "
                    "5B and up; bf16 or fp32)")
p.add_argument("--cp", type=int, default=1,
               help="context parallelism: ranks sharing each video's tokens (diffusers' Ulysses attention; Wan)")
p.add_argument("--offload-frozen", action="store_true",
               help="during the DPO update keep the text encoder, VAE and reward model in host memory (frees ~26 GiB "
                    "per GPU with UMT5-XXL + VideoScore; one host-to-device copy per step)")
p.add_argument("--seed", type=int, default=0, help="seed of prompts, candidates, DPO noise")
p.add_argument("--out", default=None,
               help="run folder (default runs/gran_dpo-<time>; with --resume, the resumed run's)")
p.add_argument("--eval-every", type=int, default=30, help="held-out evaluation interval (also at step 0 and the end)")
p.add_argument("--num-eval-prompts", type=int, default=52, help="how many held-out prompts to evaluate")
p.add_argument("--eval-seeds", type=int, default=1, help="seeds per held-out prompt (more: a lower noise floor)")
p.add_argument("--heldout-pairs", type=int, default=None,
               help="held-out prompts whose fresh pairs (sampled by the initial model) each evaluation scores by the "
                    "implicit accuracy against the initial model; default 16 on the toy model, 0 (off) otherwise")
p.add_argument("--save-every", type=int, default=30, help="checkpoint interval (and at the end)")
p.add_argument("--resume", default=None,
               help="a run folder or checkpoint to continue: restores the weights, optimizer, RNG and reference, and "
                    "the run's saved configuration (only --steps, --eval-every, --save-every, --sample-batch-size, "
                    "--out (a fork), --device may differ; README)")
p.add_argument("--track", action="store_true", help="mirror metrics to Weights & Biases (needs `pip install wandb`)")
p.add_argument("--judge-timeout", type=float, default=60.0,
               help="api:<model>@<url> rewards: seconds to wait for each answer before retrying it")
p.add_argument("--judge-retries", type=int, default=4,
               help="api: rewards: retries of a timed-out, 429/5xx, malformed or error answer (back-off 1, 2, 4 ... "
                    "s); 401/403 are not retried")
p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")


NO_PATCH_SCORES = {"judge", "api"}  # rewards.py's yes/no judges: one answer per video, nothing per patch


def dpo_loss(e_w, e_l, ref_e_w, ref_e_l, beta):
    """Diffusion-DPO per pair, from the per-sample denoising errors of policy and reference:
    inside = -beta/2 * [(e_w - e_w_ref) - (e_l - e_l_ref)],  L = -log sigmoid(inside)."""
    inside = -beta / 2 * ((e_w - ref_e_w) - (e_l - ref_e_l))
    return -F.logsigmoid(inside), inside


def patch_masks(shape, grid):
    """One-hot masks [P, F, H, W] tiling a latent of spatial-temporal shape (F, H, W) exactly once
    with a gf x gh x gw grid (cells differ by at most one row when the size is not divisible)."""
    # the cell of each index
    cells = [torch.div(torch.arange(n) * g, n, rounding_mode="floor") for n, g in zip(shape, grid)]
    f, h, w = torch.meshgrid(*cells, indexing="ij")
    idx = (f * grid[1] + h) * grid[2] + w
    return F.one_hot(idx, grid[0] * grid[1] * grid[2]).permute(3, 0, 1, 2).float()


def patch_errors(pred, target, masks, channel_dim):
    """e_p = mean over M_p of (pred - target)^2 -> [B, P]; `channel_dim` is 1 for [B, C, F, H, W]
    latents and 2 for CogVideoX's [B, F, C, H, W]."""
    sq = (pred.float() - target.float()).pow(2).mean(channel_dim)  # [B, F, H, W]
    return torch.einsum("bfhw,pfhw->bp", sq, masks) / masks.sum((1, 2, 3))


def patch_dpo_loss(e_w, e_l, ref_e_w, ref_e_l, sign, beta, weight=None):
    """The patch term: inside_p = -beta/2 * s_p * [(e_p_w - e_p_w_ref) - (e_p_l - e_p_l_ref)],
    loss = mean_p -log sigmoid(inside_p) per pair ([B, P] inputs; s_p = 0 drops a tied patch)."""
    inside = -beta / 2 * sign * ((e_w - ref_e_w) - (e_l - ref_e_l))
    losses = -F.logsigmoid(inside) * (sign != 0)
    if weight is not None:
        losses = losses * weight
    return losses.sum(1) / (sign != 0).sum(1).clamp(min=1), inside


def resolve_defaults(args, family):
    """Fill the model-dependent defaults; everything here is cheap and runs before weights load."""
    toy = family == "toy"
    args.reward = args.reward or ("toy:quality" if toy else "videoscore:visual_quality")
    args.lr = args.lr or (1e-4 if toy or args.lora_rank else 1e-5)
    if args.ref_update_interval is None:
        args.ref_update_interval = 20 if toy else 200
    args.sample_steps = args.sample_steps or (10 if toy else 30)
    args.heldout_pairs = args.heldout_pairs if args.heldout_pairs is not None else (16 if toy else 0)
    return args


def main(args):
    # ---- validate everything cheap before anything heavy loads ------------------------------
    checkpoint = common.resume_config(args, p, "gran_dpo")  # --resume: the run's own configuration, checked first
    common.check_positive(args, "steps", "batch_size", "sample_batch_size", "num_eval_prompts", "eval_every",
                          "save_every", "eval_seeds", "dpo_draws", "dpo_epochs", "sample_steps")
    if args.num_candidates < 2:  # (every pair would be skipped: a run that trains nothing)
        raise ValueError(
                         f"--num-candidates {args.num_candidates}: a pair needs two candidates of a prompt: pass 2 or "
                         f"more (paper: 4-6)")
    common.check_track(args.track)
    model_path, family = models.resolve_model(args.model)
    resolve_defaults(args, family)
    models.fill_video_args(args, model_path, family)
    common.check_branch(args.branch_at, args.sample_steps, model_path)
    if args.heldout_pairs < 0:
        raise ValueError(f"--heldout-pairs {args.heldout_pairs}: pass 0 (off) or more")
    judges = [name for _, name, _, _ in rewards.parse_reward_spec(args.reward) if name in NO_PATCH_SCORES]
    if judges:  # (a weighted sum with a judge in it used to pass the check after loading, then fail mid-run)
        raise ValueError(f"--reward {args.reward}: {judges[0]} answers yes or no per video and offers no patch scores, "
                         f"which Gran-DPO needs from every term: use e.g. toy:quality or videoscore")
    train_prompts = common.load_prompts(args.prompts)
    eval_prompts = common.load_prompts(args.eval_prompts, "--eval-prompts")
    eval_prompts = eval_prompts[: args.num_eval_prompts]
    common.check_toy_prompts(args.reward, family, train_prompts, eval_prompts)
    d = distributed.setup_distributed(args.device, args.cp)
    if args.fsdp and args.mixed_precision == "fp16":
        raise ValueError(
                         "--fsdp runs in bf16 or fp32: use --mixed-precision bf16 (fp16 loss scaling is not wired to "
                         "FSDP2)")
    if args.batch_size % d.world:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the number of ranks ({d.world})")
    grid = tuple(int(g) for g in args.patch_grid.split(","))
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"--patch-grid {args.patch_grid!r}: give three positive integers, e.g. 2,4,4")
    out = common.prepare_run_dir(args.out, "gran_dpo", args.resume, main=d.main)

    # ---- model, reward, trainable weights, reference ---------------------------------------
    dtype = common.DTYPES[args.mixed_precision]  # frozen weights are stored in the autocast dtype
    model = models.load_model(args.model, d.device, dtype, denoiser_dtype=dtype if args.lora_rank else torch.float32,
                              context_mesh=d.mesh)
    args.beta = args.beta or (100.0 if model.prediction == "flow" else 5000.0)
    reward_fn = rewards.load_reward(args.reward, d.device, dtype, fps=args.fps, judge_timeout=args.judge_timeout,
                                    judge_retries=args.judge_retries)
    if not all(hasattr(r, "patch_scores") for _, r in getattr(reward_fn, "terms", [(1.0, reward_fn)])):
        raise ValueError(
                         f"reward {reward_fn.name} offers no patch scores: Gran-DPO needs one that does (e.g. "
                         f"toy:quality)")
    args.patch_beta = args.patch_beta or args.beta
    channel_dim = 2 if family == "cogvideox" else 1
    shape = model.latent_shape(args.num_frames, args.height, args.width)
    grid_of = shape[:1] + shape[2:] if channel_dim == 2 else shape[1:]  # latent (frames, rows, columns)
    if any(g > n for g, n in zip(grid, grid_of)):  # an empty patch would make its error 0/0 and the weights NaN
        raise ValueError(f"--patch-grid {args.patch_grid} has more cells than the latent has positions "
                         f"({','.join(map(str, grid_of))} for this model and video size): pass a coarser grid")
    masks = patch_masks(grid_of, grid).to(d.device)
    torch.manual_seed(args.seed)  # LoRA's random init
    params = common.setup_trainable(model, args.lora_rank, args.lora_alpha, args.grad_checkpointing)
    distributed.broadcast_params(params, d)
    if args.fsdp:  # FSDP2: each block, then the root; trainable weights, gradients and AdamW state sharded
        params = distributed.shard(model, args.mixed_precision)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    ref = common.Reference(params, model.experts)  # f_ref: starts as the initial policy
    # --offload-frozen: the frozen models the update never calls wait in host memory while it runs
    frozen = distributed.modules_of([model.text_encoder, model.text_encoder_2, model.vae, reward_fn])
    frozen = distributed.Offload(frozen, enabled=args.offload_frozen)
    autocast = common.autocast_context(args.mixed_precision, d.device)
    scaler = common.grad_scaler(args.mixed_precision, d.device)
    video_kw = dict(num_frames=args.num_frames, height=args.height, width=args.width, steps=args.sample_steps,
                    guidance=args.guidance, guidance_2=args.guidance_2)
    eval_kw = dict(video_kw)
    video_kw["branch_at"] = args.branch_at
    def make_pairs(step, batch=None, key=()):
        """Sample N candidates per prompt with the CURRENT weights, score, pair best vs worst (steps 1-4)."""
        if batch is None:
            rng = random.Random(common.seed_for(args.seed, "prompts", step))
            batch = [rng.choice(train_prompts) for _ in range(args.batch_size)]  # same on every rank
        n_rank, N = len(batch) // d.world, args.num_candidates
        gidx = list(range(d.rank * n_rank, (d.rank + 1) * n_rank))  # this rank's shard of the batch
        prompts = [batch[i] for i in gidx for _ in range(N)]
        seeds = [common.seed_for(args.seed, *key, step, i, j) for i in gidx for j in range(N)]
        branch = None
        if args.branch_at is not None:  # aligned: the prompt's N candidates share their first noise, then branch
            seeds, branch = [common.seed_for(args.seed, *key, step, i) for i in gidx for j in range(N)], seeds
        latents, scores = common.sample_and_score(  # patch scores [B*N, P]: the same model, locally
            model, prompts, seeds, args.sample_batch_size,
            lambda v, ps: {"r": reward_fn(v, ps)["reward"], "patch": reward_fn.patch_scores(v, ps, grid).flatten(1)},
            video_kw, autocast, branch_seeds=branch)
        r, patch_r = scores["r"].view(n_rank, N), scores["patch"]
        best, worst = r.argmax(1), r.argmin(1)
        lat = latents.view(n_rank, N, *latents.shape[1:])
        patch_r = patch_r.view(n_rank, N, -1)
        ar = torch.arange(n_rank, device=r.device)
        return {"prompts": [batch[i] for i in gidx], "gidx": gidx, "x0_w": lat[ar, best], "x0_l": lat[ar, worst],
                "margin": r[ar, best] - r[ar, worst], "reward": r,
                "patch_w": patch_r[ar, best], "patch_l": patch_r[ar, worst]}

    init, heldout = None, None
    if args.heldout_pairs:  # (init: the initial weights, held only for the held-out pairs' implicit accuracy)
        init = common.Reference(params, model.experts)  # fresh held-out pairs, sampled by the initial model
        # (so before a resume loads)
        n_h = -(-args.heldout_pairs // d.world) * d.world  # (a multiple of the ranks: each samples its share)
        heldout = make_pairs(0, [eval_prompts[i % len(eval_prompts)] for i in range(n_h)], key=("heldout-pairs",))
    start_step = 0
    if checkpoint:  # (None on --resume of a run that failed before its first checkpoint: it starts afresh)
        start_step, extra = common.load_checkpoint(checkpoint, params, optimizer, scaler, model, {"ref": ref.weights})
        with torch.no_grad():
            for w, v in zip(ref.weights, extra["ref"]):
                w.copy_(v)
    if d.main:
        common.save_config(out, args, "gran_dpo", model_path=model.path, family=family, reward_name=reward_fn.name,
                           world_size=d.world, heldout_prompts=len(eval_prompts))
    log = common.MetricsLogger(out, enabled=d.main, track=args.track, config=vars(args),  # (--resume: without the
                               resume_step=start_step if args.resume else None, final_step=args.steps)  # rows to redo)

    def evaluate(step):
        """Every reward dimension on held-out prompts (--eval-seeds fixed seeds each), and defective patches per
        video."""
        def extra(videos, prompts):
            patch = reward_fn.patch_scores(videos, prompts, grid)
            figures = {"defective_patches": (patch < args.defect_threshold).flatten(1).float().sum(1)}
            if family == "toy":
                figures["color_accuracy"] = toy_world.ToyReward().color_accuracy(videos, prompts)
            return figures

        means = common.evaluate(model, reward_fn, eval_prompts, args.seed, eval_kw, d, autocast,
                                os.path.join(out, "samples", f"step-{step:06d}.mp4"), extra, args.sample_batch_size,
                                args.eval_seeds)
        if heldout is not None:  # does the preference generalise to pairs it never saw?
            hits = common.implicit_accuracy(model, heldout["x0_w"], heldout["x0_l"], heldout["prompts"], init,
                                            common.seed_for(args.seed, "heldout-pairs"),
                                            [(g,) for g in heldout["gidx"]], 4, autocast,
                                            args.timestep_sampling, args.sample_batch_size)
            means |= {"heldout_implicit_acc": distributed.all_mean({"a": sum(hits)}, d)["a"] / max(len(hits), 1)}
        row = {"step": step, "eval": True} | {f"eval/{k}": v for k, v in means.items()}
        log.log(row)
        return row

    if start_step == 0:
        evaluate(0)
    bar = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, desc="gran_dpo",
               disable=not d.main)
    for step in bar:
        t0 = time.time()
        # 1-4. sample candidates from the current policy, score, pair best (w) vs worst (l)
        pairs = make_pairs(step)
        t_sample = time.time() - t0
        keep = pairs["margin"] >= args.min_margin
        n_local = int(keep.sum())
        n_global = int(distributed.all_mean({"n": n_local}, d)["n"] * d.world + 0.5)
        gap_mean = 1.0
        if args.gap_weighting:  # the mean patch-reward gap over ALL ranks' kept pairs, as one process has it
            gaps = (pairs["patch_w"] - pairs["patch_l"])[keep].abs()
            g = distributed.all_mean({"sum": gaps.sum().item(), "n": gaps.numel()}, d)
            gap_mean = max(g["sum"] / max(g["n"], 1e-9), 1e-8)

        # 5. Diffusion-DPO: each of K draws is ONE (t, eps) per pair, shared by its two members; E updates
        loss_value, acc, inside_mean, video_loss, patch_loss, patch_acc, disagree, grad_norm = (0.0,) * 8
        for epoch in range(args.dpo_epochs if n_global > 0 else 0):
            if n_local > 0 or args.fsdp:  # (a rank whose pairs were all filtered still joins the gradient average;
                # under FSDP it must also run the forward, a collective: all its pairs, weighted 0 when filtered)
                ki = list(range(len(keep))) if args.fsdp else keep.nonzero().flatten().tolist()
                counts = keep[ki].float().to(d.device)  # 1: the pair counts; 0: run only to keep FSDP in step
                on = counts > 0
                x0 = torch.cat([pairs["x0_w"][ki], pairs["x0_l"][ki]]).to(d.device)
                emb, mask = model.encode_prompts([pairs["prompts"][i] for i in ki] * 2)
                gap = pairs["patch_w"][ki] - pairs["patch_l"][ki]  # [pairs, P]
                sign = torch.sign(gap).to(d.device)  # s_p: +1 where the video winner also wins the patch
                weight = (gap.abs() / gap_mean).to(d.device) if args.gap_weighting else None
                frozen.away()  # (until the next sampling; no-op without --offload-frozen)
                sums = {}  # per-pair figures summed over the draws
                for k in range(args.dpo_draws):  # (one backward per draw: memory does not grow with K)
                    draw = (epoch, k) if epoch or k else ()
                    gens = [torch.Generator().manual_seed(
                        common.seed_for(args.seed, "dpo", step, pairs["gidx"][i], *draw)) for i in ki]
                    t = torch.cat([common.sample_train_timesteps(model, 1, g, args.timestep_sampling) for g in gens])
                    eps = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(d.device)
                    t, eps = torch.cat([t, t]).to(d.device), torch.cat([eps, eps])  # shared by w and l
                    x_t, target = common.noisy_and_target(model, x0, eps, t)
                    with autocast:  # reference first (it swaps weights), then the policy
                        ref_pred = ref.forward(model.denoise, x_t, t, emb, mask)
                        pred = model.denoise(x_t, t, emb, mask)
                    err, ref_err = common.per_sample_mse(pred, target), common.per_sample_mse(ref_pred, target)
                    e_w, e_l = err.chunk(2)  # e(theta) = mse(f_theta(x_t, t, c), target(x0, eps, t))
                    r_w, r_l = ref_err.chunk(2)
                    # video term: -log sigmoid(-beta/2 [dw - dl])
                    v_losses, inside = dpo_loss(e_w, e_l, r_w, r_l, args.beta)
                    # patch term: per-patch errors under the masks, winners from the patch rewards
                    pe_w, pe_l = patch_errors(pred, target, masks, channel_dim).chunk(2)
                    pr_w, pr_l = patch_errors(ref_pred, target, masks, channel_dim).chunk(2)
                    p_losses, inside_p = patch_dpo_loss(pe_w, pe_l, pr_w, pr_l, sign, args.patch_beta, weight)
                    losses = v_losses + args.patch_weight * p_losses  # L = L_video + lambda * mean_p L_p
                    # L = mean over pairs and draws: sum / global count * world / K (the mean over ALL pairs after
                    # the average over ranks)
                    scaler.scale((losses * counts).sum() / n_global * d.world / args.dpo_draws).backward()
                    for name, v in (("loss", losses), ("inside", inside), ("video", v_losses), ("patch", p_losses),
                                    ("inside_p", inside_p)):
                        sums[name] = sums.get(name, 0.0) + v.detach() / args.dpo_draws
                if n_local:
                    sign_on, inside_p_on = sign[on], sums["inside_p"][on]
                    for name, value in (("loss", sums["loss"][on].mean()),
                                        ("acc", (sums["inside"][on] > 0).float().mean()),
                                        ("inside", sums["inside"][on].mean()), ("video", sums["video"][on].mean()),
                                        ("patch", sums["patch"][on].mean()),
                                        ("patch_acc", ((inside_p_on > 0) & (sign_on != 0)).float().sum()
                                         / max((sign_on != 0).sum().item(), 1)),
                                        ("disagree", (sign_on < 0).float().mean())):
                        sums["epoch_" + name] = value.item() / args.dpo_epochs
                    loss_value, acc = loss_value + sums["epoch_loss"], acc + sums["epoch_acc"]
                    inside_mean, video_loss = inside_mean + sums["epoch_inside"], video_loss + sums["epoch_video"]
                    patch_loss, patch_acc = patch_loss + sums["epoch_patch"], patch_acc + sums["epoch_patch_acc"]
                    disagree += sums["epoch_disagree"]
            distributed.average_gradients(params, d)
            scaler.unscale_(optimizer)  # fp16: clip the true gradients (a no-op otherwise)
            grad_norm = distributed.clip_grad_norm(params, args.max_grad_norm)
            scaler.step(optimizer)  # skipped when fp16 gradients overflowed
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            frozen.back()

        # 6. curriculum: the reference catches up with the policy every I steps
        if args.ref_update_interval and (step + 1) % args.ref_update_interval == 0:
            ref.update()

        dt = time.time() - t0
        stats = distributed.all_mean({"loss": loss_value * n_local, "implicit_acc": acc * n_local,
                                      "inside": inside_mean * n_local,
                                      "video_loss": video_loss * n_local, "patch_loss": patch_loss * n_local,
                                      "patch_acc": patch_acc * n_local, "patch_disagree": disagree * n_local,
                                      "reward_mean": pairs["reward"].mean().item(),
                                      "reward_min": pairs["reward"].min().item(),
                                      "reward_max": pairs["reward"].max().item(),
                                      "margin": pairs["margin"].mean().item(), "pairs": n_local}, d)
        pairs_total = max(stats["pairs"] * d.world, 1e-9)
        row = {"step": step + 1, "loss": stats["loss"] * d.world / pairs_total,
               "implicit_acc": stats["implicit_acc"] * d.world / pairs_total,
               "inside_mean": stats["inside"] * d.world / pairs_total, "reward_mean": stats["reward_mean"],
               **{k: stats[k] * d.world / pairs_total
                  for k in ("video_loss", "patch_loss", "patch_acc", "patch_disagree")},
               "reward_min": stats["reward_min"], "reward_max": stats["reward_max"], "margin": stats["margin"],
               "pairs_used": n_global, "pairs_skipped": len(keep) * d.world - n_global, "grad_norm": grad_norm,
               "sec_per_step": dt, "sec_sampling": t_sample,
               "samples_per_s": args.batch_size * args.num_candidates / max(dt, 1e-9)}
        log.log(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['implicit_acc']:.2f}", reward=f"{row['reward_mean']:.3f}")

        if (step + 1) % args.eval_every == 0 and step + 1 != args.steps:
            evaluate(step + 1)
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            common.save_checkpoint(os.path.join(out, "checkpoints"), step + 1, model, params, optimizer,  # (every rank:
                                   extra={"ref": ref.weights}, lora=args.lora_rank > 0, scaler=scaler,
                                   d=d)  # FSDP writes shards)
    final = evaluate(args.steps)
    if d.main:
        first = next(r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl")))
                     if r.get("eval") and r["step"] == 0)
        print(f"eval/reward: {first['eval/reward']:.4f} -> {final['eval/reward']:.4f}  ({reward_fn.name}, "
              f"{len(eval_prompts)} held-out prompts; run folder {out})")
    if d.main and args.lora_rank:  # a model card beside the final LoRA, from the run's files
        models.write_model_card(out, "gran_dpo", "Gran-DPO (HALO)", "arXiv 2502.06812",
                                args.steps * args.batch_size * args.num_candidates)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return out


if __name__ == "__main__":
    main(common.parse_args(p))
