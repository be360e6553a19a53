"""Flow-GRPO: group-relative policy optimisation for flow-matching text-to-video models.

Papers: "Flow-GRPO: Training Flow Matching Models via Online RL" (arXiv 2505.05470) and "DanceGRPO" (arXiv
2505.07818). The baseline every 2026 video-RL framework ships. Each step samples a GROUP of G videos per prompt
with an SDE form of the flow sampler, which makes every step a Gaussian transition with a log-probability;
scores them with any reward; turns the rewards into group-relative advantages; and takes PPO-clipped
policy-gradient steps on the transitions, with a closed-form KL to the initial model.
Reconstructed details (from the papers and Flow-GRPO's public code, where the papers leave them open): the
SDE step and its std a * sqrt(sigma / (1 - sigma)) (at sigma = 1 the denominator uses the next sigma), the
log-probability as the MEAN over latent elements, advantages (r - group mean) / (group std + 1e-4) clipped at
+-5, the KL as |mu_theta - mu_ref|^2 / (2 std^2) averaged over elements, CFG in sampling and in the recomputed
log-probabilities. `--sde-window` (MixGRPO / Flow-GRPO-Fast): the SDE only on a window of steps, ODE elsewhere,
so only those steps are trained. Flow families only (toy, Wan 2.1/2.2, HunyuanVideo 1.5, LTX-Video): the
CogVideoX and ModelScope samplers are not flows, and are refused before loading.

    python flow_grpo.py                                        # toy model, CPU
    torchrun --nproc_per_node 8 flow_grpo.py --model wan2.1-1.3b --reward videoscore --prompts p.txt
"""
import argparse
import contextlib
import json
import math
import os
import random
import time

import torch
from tqdm import tqdm

import common
import distributed
import models
import rewards
import toy_world

p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=common.HelpFormatter)
p.add_argument("--model", default="toy",
               help="'toy', an alias (wan2.1-1.3b, hunyuanvideo1.5, ...), a diffusers folder or hub id (flow models)")
p.add_argument("--reward", default=None,
               help="reward spec; default toy:text on the toy model, videoscore:temporal_consistency otherwise")
p.add_argument("--prompts", default="toy_train",
               help=f"training prompts: a text file (UTF-8, one per line) or a built-in list: {common.prompt_lists()}")
p.add_argument("--eval-prompts", default="toy_heldout",
               help="HELD-OUT evaluation prompts: a text file or a built-in list (as --prompts)")
p.add_argument("--steps", type=int, default=60, help="rollout-and-update steps")
p.add_argument("--batch-size", type=int, default=8, help="prompts per step, summed over ranks (each a whole group)")
p.add_argument("--group-size", type=int, default=4, help="G: videos sampled per prompt (Flow-GRPO: 24)")
p.add_argument("--sde-noise", type=float, default=0.7, help="a: the SDE's noise level (Flow-GRPO: 0.7)")
p.add_argument("--sde-window", default=None,
               help="'start:end': the sampler steps that run the SDE (and are trained); ODE elsewhere (default: all; "
                    "0:2 on the toy model)")
p.add_argument("--same-noise", action="store_true",
               help="a group's videos start from ONE initial noise and differ only by the SDE window's noise "
                    "(DanceGRPO's use_same_noise; no gain on the toy model: docs/results.md)")
p.add_argument("--train-timestep-fraction", type=float, default=1.0,
               help="fraction of the SDE steps trained per update, drawn afresh (Flow-GRPO: 0.99)")
p.add_argument("--clip-range", type=float, default=1e-4, help="PPO clip range of the ratio (Flow-GRPO: 1e-4)")
p.add_argument("--adv-clip", type=float, default=5.0, help="advantages are clipped to +-this (Flow-GRPO: 5)")
p.add_argument("--kl-beta", type=float, default=0.04, help="weight of the KL to the initial model (0: no reference)")
p.add_argument("--inner-epochs", type=int, default=1, help="passes over each rollout batch")
p.add_argument("--minibatches", type=int, default=1,
               help="optimizer steps per pass, each on an equal share of the groups (Flow-GRPO: 2)")
p.add_argument("--lr", type=float, default=None,
               help="AdamW learning rate; default 1e-4 with LoRA or on the toy model, 1e-5 for a full fine-tune")
p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping")
p.add_argument("--ema", action="store_true", help="evaluate an EMA of the trainable weights (as Flow-GRPO does)")
p.add_argument("--ema-decay", type=float, default=0.9, help="EMA decay per optimizer step")
p.add_argument("--sample-batch-size", type=int, default=8,
               help="videos per sampler/decoder call and per training forward (results do not depend on it)")
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
               help="frame rate of the generated clips, for rewards that sample by time (default: the model's)")
p.add_argument("--grad-checkpointing", action="store_true",
               help="gradient checkpointing in the denoiser (saves memory)")
p.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"],
               help="autocast dtype; frozen weights are stored in it, trainable ones stay fp32")
p.add_argument("--fsdp", action="store_true", help="shard the denoiser with PyTorch FSDP2 over the torchrun ranks")
p.add_argument("--cp", type=int, default=1,
               help="context parallelism: ranks sharing each video's tokens (diffusers' Ulysses attention; Wan)")
p.add_argument("--offload-frozen", action="store_true",
               help="during the update keep the text encoder, VAE and reward model in host memory")
p.add_argument("--seed", type=int, default=0, help="seed of prompts, samples and SDE noise")
p.add_argument("--out", default=None,
               help="run folder (default runs/flow_grpo-<time>; with --resume, the resumed run's)")
p.add_argument("--eval-every", type=int, default=30, help="held-out evaluation interval (also at step 0 and the end)")
p.add_argument("--num-eval-prompts", type=int, default=52, help="how many held-out prompts to evaluate")
p.add_argument("--eval-seeds", type=int, default=1, help="seeds per held-out prompt (more: a lower noise floor)")
p.add_argument("--save-every", type=int, default=30, help="checkpoint interval (and at the end)")
p.add_argument("--resume", default=None,
               help="a run folder or checkpoint to continue: restores the weights, optimizer, RNG, reference and EMA, "
                    "and the run's saved configuration (README, What a run leaves behind)")
p.add_argument("--track", action="store_true", help="mirror metrics to Weights & Biases (needs `pip install wandb`)")
p.add_argument("--judge-timeout", type=float, default=60.0,
               help="api:<model>@<url> rewards: seconds to wait for each answer before retrying it")
p.add_argument("--judge-retries", type=int, default=4, help="api: rewards: retries of a failed answer")
p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")


def sde_step(x, v, sigma, sigma_next, noise_level, sigma_max, noise=None):
    """One step of Flow-GRPO's SDE from sigma to sigma_next < sigma, for x_sigma = (1 - sigma) x0 + sigma eps and
    v = eps - x0 (the flow prediction). With dt = sigma_next - sigma < 0 and std_t = a sqrt(sigma / (1 - sigma)):
      mean = x (1 + std_t^2 dt / (2 sigma)) + v (1 + std_t^2 (1 - sigma) / (2 sigma)) dt,
      x_next = mean + std_t sqrt(-dt) noise.
    a = 0 gives the Euler ODE step x + v dt. Returns (x_next, mean, std) with std = std_t sqrt(-dt)."""
    dt = sigma_next - sigma
    std_t = noise_level * math.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma)))
    x, v = x.float(), v.float()  # (bf16 overflows here: Flow-GRPO computes the step in fp32)
    mean = x * (1 + std_t ** 2 / (2 * sigma) * dt) + v * (1 + std_t ** 2 * (1 - sigma) / (2 * sigma)) * dt
    std = std_t * math.sqrt(-dt)
    return (mean if noise is None or std == 0 else mean + std * noise), mean, std


def sde_logprob(x_next, mean, std):
    """log N(x_next; mean, std^2 I), averaged over the latent's elements (Flow-GRPO's per-sample log-probability)."""
    lp = -(x_next.detach().float() - mean) ** 2 / (2 * std ** 2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(1)


def group_advantages(rewards_, clip):
    """[n_groups, G] rewards -> advantages (r - group mean) / (group std + 1e-4), clipped to +-clip; a group whose
    rewards are all equal gets exactly 0 (it carries no preference). Also returns which groups were dropped."""
    mean, std = rewards_.mean(1, keepdim=True), rewards_.std(1, unbiased=False, keepdim=True)
    adv = ((rewards_ - mean) / (std + 1e-4)).clamp(-clip, clip)
    dropped = (rewards_ == rewards_[:, :1]).all(1)
    return torch.where(dropped[:, None], torch.zeros_like(adv), adv), dropped


def grpo_loss(logp, logp_old, adv, clip_range):
    """PPO's clipped objective per sample: max(-A ratio, -A clip(ratio, 1 - c, 1 + c)), ratio = exp(logp - logp_old).
    Returns (loss per sample, ratio)."""
    ratio = torch.exp(logp - logp_old)
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range)), ratio


def guided_velocity(model, x, t, emb, mask, nemb, nmask, guidance, guidance_2=None):
    """The guided flow prediction v = v_u + g (v_c - v_u) at one sampler step, batched [uncond; cond] as the sampler
    computes it (Wan 2.2 A14B: the low-noise expert's guidance below its boundary)."""
    g = guidance if model.denoiser_2 is None or t >= model.boundary or guidance_2 is None else guidance_2
    if g <= 1.0:
        return model.denoise(x, t.expand(len(x)), emb, mask).float()
    both = model.denoise(torch.cat([x, x]), t.expand(2 * len(x)), torch.cat([nemb, emb]),
                         None if mask is None else torch.cat([nmask, mask])).float()
    uncond, cond = both.chunk(2)
    return uncond + g * (cond - uncond)


@torch.no_grad()
def sde_sample(model, prompts, seeds, video_kw, window, noise_level, autocast=None, init_seeds=None):
    """Sample one video per (prompt, seed) with the SDE on the steps in `window` (the ODE elsewhere), keeping each
    window step's transition (x_i, x_{i+1}) and its log-probability under the sampling policy. Per-sample seeds
    draw the initial noise and then each step's noise, so a video does not depend on its batch; `init_seeds`, if
    given, draw the initial noise instead (videos of one group share it)."""
    kw = video_kw
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    init = gens if init_seeds is None else [torch.Generator().manual_seed(int(s)) for s in init_seeds]
    shape = model.latent_shape(kw["num_frames"], kw["height"], kw["width"])
    x = torch.cat([torch.randn((1, *shape), generator=g) for g in init]).to(model.device)
    timesteps = model.set_timesteps(kw["steps"], shape)
    sigmas = model.scheduler.sigmas.tolist()
    emb, mask = model.encode_prompts(list(prompts))
    nemb, nmask = model.encode_prompts([""] * len(prompts))
    xs, x_nexts, logps = [], [], []
    with (autocast or contextlib.nullcontext()):
        for i, t in enumerate(timesteps):
            v = guided_velocity(model, x, t, emb, mask, nemb, nmask, kw["guidance"], kw.get("guidance_2"))
            a = noise_level if i in window else 0.0
            noise = torch.cat([torch.randn((1, *shape), generator=g) for g in gens]).to(x.device)
            x_next, mean, std = sde_step(x, v, sigmas[i], sigmas[i + 1], a, sigmas[1], noise)
            if i in window:  # eq.: log p(x_{i+1} | x_i) under the sampling policy
                xs.append(x), x_nexts.append(x_next), logps.append(sde_logprob(x_next, mean, std))
            x = x_next.to(x.dtype)
        videos = model.decode(x)
    stack = (lambda ts: torch.stack(ts, 1)) if window else (lambda ts: None)
    return {"x": stack(xs), "x_next": stack(x_nexts), "logp": stack(logps), "latents": x, "videos": videos,
            "timesteps": timesteps, "sigmas": sigmas}


def transition(model, x, x_next, i, timesteps, sigmas, noise_level, emb, mask, nemb, nmask, guidance, guidance_2=None):
    """The current weights' Gaussian transition at sampler step i: (log p(x_next | x), its mean, its std)."""
    v = guided_velocity(model, x, timesteps[i], emb, mask, nemb, nmask, guidance, guidance_2)
    _, mean, std = sde_step(x, v, sigmas[i], sigmas[i + 1], noise_level, sigmas[1])
    return sde_logprob(x_next, mean, std), mean, std


def resolve_defaults(args, family):
    """Fill the model-dependent defaults; everything here is cheap and runs before weights load."""
    toy = family == "toy"
    args.reward = args.reward or ("toy:text" if toy else "videoscore:temporal_consistency")
    args.lr = args.lr or (1e-4 if toy or args.lora_rank else 1e-5)
    args.sample_steps = args.sample_steps or (10 if toy else 30)
    if args.sde_window is None and toy:  # (2 cores: every step's SDE and training cost 5x the sampling)
        args.sde_window = "0:2"
    return args


def parse_window(spec, steps):
    """--sde-window 'start:end' -> the list of SDE (trained) sampler steps; None: all steps."""
    if spec is None:
        return list(range(steps))
    try:
        start, end = (int(x) for x in spec.split(":"))
    except ValueError:
        raise ValueError(f"--sde-window {spec!r}: pass 'start:end', e.g. 0:3 (sampler steps)") from None
    if not 0 <= start < end <= steps:
        raise ValueError(f"--sde-window {spec}: needs 0 <= start < end <= --sample-steps ({steps})")
    return list(range(start, end))


def main(args):
    # ---- validate everything cheap before anything heavy loads ------------------------------
    checkpoint = common.resume_config(args, p, "flow_grpo")  # --resume: the run's own configuration, checked first
    common.check_positive(args, "steps", "batch_size", "sample_batch_size", "num_eval_prompts", "eval_every",
                          "save_every", "eval_seeds", "inner_epochs", "minibatches", "sample_steps")
    if args.group_size < 2:  # (a group of one has no relative advantage: a run that trains nothing)
        raise ValueError(f"--group-size {args.group_size}: advantages compare videos of one prompt: pass 2 or more")
    for flag, ok, rule in (("sde-noise", args.sde_noise > 0, "> 0"), ("clip-range", args.clip_range > 0, "> 0"),
                           ("train-timestep-fraction", 0 < args.train_timestep_fraction <= 1, "in (0, 1]"),
                           ("ema-decay", 0 <= args.ema_decay < 1, "in [0, 1)"), ("kl-beta", args.kl_beta >= 0, ">= 0"),
                           ("adv-clip", args.adv_clip > 0, "> 0")):
        if not ok:
            raise ValueError(f"--{flag} {getattr(args, flag.replace('-', '_'))}: must be {rule}")
    common.check_track(args.track)
    model_path, family = models.resolve_model(args.model)
    resolve_defaults(args, family)
    models.fill_video_args(args, model_path, family)
    if not common.is_flow_sampler(model_path):
        raise ValueError(f"--model {args.model}: {family} does not sample a flow (its scheduler is not flow "
                         f"matching), and GRPO's SDE needs one: use a flow model (toy, Wan, HunyuanVideo 1.5, LTX)")
    window = parse_window(args.sde_window, args.sample_steps)
    rewards.parse_reward_spec(args.reward)
    train_prompts = common.load_prompts(args.prompts)
    eval_prompts = common.load_prompts(args.eval_prompts, "--eval-prompts")[: args.num_eval_prompts]
    common.check_toy_prompts(args.reward, family, train_prompts, eval_prompts)
    d = distributed.setup_distributed(args.device, args.cp)
    if args.fsdp and args.mixed_precision == "fp16":
        raise ValueError("--fsdp runs in bf16 or fp32: use --mixed-precision bf16")
    if args.batch_size % (d.world * args.minibatches):
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the number of ranks ({d.world}) "
                         f"times --minibatches ({args.minibatches})")
    out = common.prepare_run_dir(args.out, "flow_grpo", args.resume, main=d.main)

    # ---- model, reward, trainable weights, reference, EMA -----------------------------------
    dtype = common.DTYPES[args.mixed_precision]
    model = models.load_model(args.model, d.device, dtype, denoiser_dtype=dtype if args.lora_rank else torch.float32,
                              context_mesh=d.mesh)
    reward_fn = rewards.load_reward(args.reward, d.device, dtype, fps=args.fps, judge_timeout=args.judge_timeout,
                                    judge_retries=args.judge_retries)
    torch.manual_seed(args.seed)  # LoRA's random init
    params = common.setup_trainable(model, args.lora_rank, args.lora_alpha, args.grad_checkpointing)
    distributed.broadcast_params(params, d)
    if args.fsdp:
        params = distributed.shard(model, args.mixed_precision)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    ref = common.Reference(params, model.experts)  # pi_ref: the initial weights, never updated
    ema = common.Reference(params, model.experts) if args.ema else None  # its `weights`: the EMA
    frozen = distributed.modules_of([model.text_encoder, model.text_encoder_2, model.vae, reward_fn])
    frozen = distributed.Offload(frozen, enabled=args.offload_frozen)
    autocast = common.autocast_context(args.mixed_precision, d.device)
    scaler = common.grad_scaler(args.mixed_precision, d.device)
    eval_kw = dict(num_frames=args.num_frames, height=args.height, width=args.width, steps=args.sample_steps,
                   guidance=args.guidance, guidance_2=args.guidance_2)
    G = args.group_size

    video_kw = dict(eval_kw)

    def rollout(step):
        """1-2. A group of G videos per prompt from the CURRENT policy with the SDE sampler, each window step's
        (x_i, x_{i+1}, log-prob) kept; the videos scored. Seeds are per video, so ranks never change the samples."""
        rng = random.Random(common.seed_for(args.seed, "prompts", step))
        batch = [rng.choice(train_prompts) for _ in range(args.batch_size)]  # same on every rank
        n_rank = len(batch) // d.world
        gidx = list(range(d.rank * n_rank, (d.rank + 1) * n_rank))  # this rank's prompts, each a whole group
        prompts = [batch[i] for i in gidx for _ in range(G)]
        seeds = [common.seed_for(args.seed, step, i, j) for i in gidx for j in range(G)]
        init = [common.seed_for(args.seed, step, i) for i in gidx for _ in range(G)]  # one initial noise per group
        parts, scores = [], []
        for c in range(0, len(prompts), args.sample_batch_size):
            sl = slice(c, c + args.sample_batch_size)
            part = sde_sample(model, prompts[sl], seeds[sl], video_kw, window, args.sde_noise, autocast,
                              init[sl] if args.same_noise else None)
            scores.append(reward_fn(part.pop("videos"), prompts[sl])["reward"].float())
            parts.append(part)
        return {"prompts": prompts, "reward": torch.cat(scores).view(n_rank, G),
                "timesteps": parts[0]["timesteps"], "sigmas": parts[0]["sigmas"]} | \
            {k: torch.cat([q[k] for q in parts]) for k in ("x", "x_next", "logp")}

    start_step = 0
    if checkpoint:
        like = {"ref": ref.weights} | ({"ema": ema.weights} if ema else {})
        start_step, extra = common.load_checkpoint(checkpoint, params, optimizer, scaler, model, like)
        with torch.no_grad():
            for name, holder in (("ref", ref), ("ema", ema)):
                for w, v in zip(holder.weights if holder else [], extra.get(name, [])):
                    w.copy_(v)
    if d.main:
        common.save_config(out, args, "flow_grpo", model_path=model.path, family=family, reward_name=reward_fn.name,
                           world_size=d.world, heldout_prompts=len(eval_prompts))
    log = common.MetricsLogger(out, enabled=d.main, track=args.track, config=vars(args),
                               resume_step=start_step if args.resume else None, final_step=args.steps)

    def evaluate(step):
        """Every reward dimension on held-out prompts with the ODE sampler (the EMA's weights with --ema)."""
        extra = None
        if family == "toy":
            extra = lambda v, ps: {"color_accuracy": toy_world.ToyReward().color_accuracy(v, ps)}  # noqa: E731
        run = lambda: common.evaluate(model, reward_fn, eval_prompts, args.seed, eval_kw, d, autocast,  # noqa: E731
                                      os.path.join(out, "samples", f"step-{step:06d}.mp4"), extra,
                                      args.sample_batch_size, args.eval_seeds)
        means = ema.forward(run) if ema else run()
        row = {"step": step, "eval": True} | {f"eval/{k}": v for k, v in means.items()}
        log.log(row)
        return row

    if start_step == 0:
        evaluate(0)
    bar = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, desc="flow_grpo",
               disable=not d.main)
    n_global = args.batch_size * G
    for step in bar:
        t0 = time.time()
        # 1-2. rollouts: G videos per prompt with the SDE sampler, their transitions' log-probs, their rewards
        roll = rollout(step)
        t_sample = time.time() - t0
        adv, dropped = group_advantages(roll["reward"], args.adv_clip)  # eq.: A_i = (r_i - mean) / std, per group
        adv = adv.flatten().to(d.device)

        # 3. PPO-clipped policy gradient on the window's transitions, KL to the initial model in closed form
        emb, mask = model.encode_prompts(roll["prompts"])  # (before the text encoder leaves with --offload-frozen)
        nemb, nmask = model.encode_prompts([""] * len(roll["prompts"]))
        frozen.away()
        sums = {"loss": 0.0, "policy": 0.0, "kl": 0.0, "ratio": 0.0, "clipped": 0.0, "terms": 0}
        n_videos = len(roll["prompts"])
        for epoch, m in ((e, m) for e in range(args.inner_epochs) for m in range(args.minibatches)):
            rng = random.Random(common.seed_for(args.seed, "timesteps", step, epoch))  # same on every rank
            k = max(1, round(args.train_timestep_fraction * len(window)))
            trained = sorted(rng.sample(range(len(window)), k))
            # minibatch m: the groups g with g % M == m (the same groups however many ranks hold the batch)
            share = [v for v in range(n_videos) if (v // G) % args.minibatches == m]
            for w in trained:
                i = window[w]
                for c in range(0, len(share), args.sample_batch_size):
                    sl = torch.tensor(share[c: c + args.sample_batch_size])
                    x, x_next = roll["x"][sl, w], roll["x_next"][sl, w]
                    m_args = (emb[sl], None if mask is None else mask[sl],
                              nemb[sl], None if nmask is None else nmask[sl])
                    step_args = (i, roll["timesteps"], roll["sigmas"], args.sde_noise, *m_args, args.guidance,
                                 args.guidance_2)
                    with autocast:
                        ref_mean = None
                        if args.kl_beta:  # the reference first (it swaps weights), then the policy
                            ref_mean = ref.forward(transition, model, x, x_next, *step_args)[1]
                        logp, mean, std = transition(model, x, x_next, *step_args)  # eq.: log pi_theta(x_{i+1} | x_i)
                    losses, ratio = grpo_loss(logp, roll["logp"][sl, w], adv[sl], args.clip_range)
                    kl = ((mean - ref_mean) ** 2).flatten(1).mean(1) / (2 * std ** 2) if args.kl_beta else \
                        torch.zeros_like(losses)  # eq.: KL(pi || pi_ref) = |mu - mu_ref|^2 / (2 std^2)
                    # L = mean over the minibatch's videos and trained steps (after the average over ranks)
                    total = (losses + args.kl_beta * kl).sum() / (n_global / args.minibatches) * d.world / len(trained)
                    scaler.scale(total).backward()
                    sums["loss"] += total.item() / (args.inner_epochs * args.minibatches)
                    sums["policy"] += losses.sum().item()
                    sums["kl"] += kl.sum().item()
                    sums["ratio"] += ratio.sum().item()
                    sums["clipped"] += ((ratio - 1).abs() > args.clip_range).float().sum().item()
                    sums["terms"] += len(losses)
            distributed.average_gradients(params, d)
            scaler.unscale_(optimizer)
            grad_norm = distributed.clip_grad_norm(params, args.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if ema:  # the EMA follows each optimizer step
                with torch.no_grad():
                    for e, q in zip(ema.weights, params):
                        e.mul_(args.ema_decay).add_(q.detach(), alpha=1 - args.ema_decay)
        frozen.back()

        dt = time.time() - t0
        terms = max(sums["terms"], 1)
        stats = distributed.all_mean({"loss": sums["loss"], "policy": sums["policy"] / terms, "kl": sums["kl"] / terms,
                                      "ratio": sums["ratio"] / terms, "clipped": sums["clipped"] / terms,
                                      "reward_mean": roll["reward"].mean().item(),
                                      "reward_std": roll["reward"].std(1, unbiased=False).mean().item(),
                                      "dropped": dropped.float().sum().item()}, d)
        row = {"step": step + 1, "loss": stats["loss"], "policy_loss": stats["policy"], "kl": stats["kl"],
               "ratio_mean": stats["ratio"], "clip_frac": stats["clipped"], "reward_mean": stats["reward_mean"],
               "reward_group_std": stats["reward_std"], "groups_dropped": round(stats["dropped"] * d.world),
               "grad_norm": grad_norm, "sec_per_step": dt, "sec_sampling": t_sample,
               "samples_per_s": n_global / max(dt, 1e-9)}
        log.log(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", kl=f"{row['kl']:.4f}", reward=f"{row['reward_mean']:.3f}")

        if (step + 1) % args.eval_every == 0 and step + 1 != args.steps:
            evaluate(step + 1)
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            common.save_checkpoint(os.path.join(out, "checkpoints"), step + 1, model, params, optimizer,
                                   extra={"ref": ref.weights} | ({"ema": ema.weights} if ema else {}),
                                   lora=args.lora_rank > 0, scaler=scaler, d=d)
    final = evaluate(args.steps)
    if d.main:
        first = next(r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl")))
                     if r.get("eval") and r["step"] == 0)
        print(f"eval/reward: {first['eval/reward']:.4f} -> {final['eval/reward']:.4f}  ({reward_fn.name}, "
              f"{len(eval_prompts)} held-out prompts; run folder {out})")
    if d.main and args.lora_rank:
        models.write_model_card(out, "flow_grpo", "Flow-GRPO", "arXiv 2505.05470", args.steps * n_global)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return out


if __name__ == "__main__":
    main(common.parse_args(p))
