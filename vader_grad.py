"""VADER: video diffusion alignment by backpropagating reward gradients through the sampler.

Paper: "Video Diffusion Alignment via Reward Gradients" (arXiv 2407.08737). Maximise
E_c R(decode(x0(c)), c) by running the sampler and backpropagating the reward through the decoder
and the LAST K sampler steps only (truncated backprop; steps before the cut-off run under no_grad),
with gradient checkpointing on every grad-carrying denoiser call and only a subset of frames
decoded for the reward. These are VADER's memory techniques; benchmarks/vader_memory.py measures
each one. loss = -reward (or |target - reward| for a bounded reward), grad clip 1.0, LoRA.
`--refl` is the OnlineVPO paper's ReFL baseline: the reward of the ONE-STEP x0 prediction at a
random late timestep (the final sample re-noised there), no backprop through the sampler.

    python vader_grad.py                                     # toy model, differentiable toy reward, CPU
    torchrun --nproc_per_node 8 vader_grad.py --model wan2.1-1.3b --reward aesthetic --prompts p.txt
"""
import argparse
import json
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

p = argparse.ArgumentParser(description="VADER: reward-gradient alignment through the sampler",
                            formatter_class=common.HelpFormatter)
p.add_argument("--model", default="toy",
               help="'toy', an alias (wan2.1-1.3b, cogvideox-2b, ...), a diffusers folder or hub id")
p.add_argument("--reward", default="toy:quality",
               help="a DIFFERENTIABLE reward spec (e.g. toy:quality, toy:text, aesthetic, hpsv2)")
p.add_argument("--reward-target", type=float, default=None,
               help="minimise |target - reward| instead of maximising the reward")
p.add_argument("--prompts", default="toy_train",
               help=f"training prompts: a text file (UTF-8, one per line) or a built-in list: {common.prompt_lists()}")
p.add_argument("--eval-prompts", default="toy_heldout",
               help="HELD-OUT evaluation prompts: a text file or a built-in list (as --prompts)")
p.add_argument("--steps", type=int, default=30,
               help="optimisation steps (on the previous toy base the held-out reward peaked near 30, then fell)")
p.add_argument("--batch-size", type=int, default=8, help="videos per optimisation step, summed over ranks")
p.add_argument("--sample-batch-size", type=int, default=8,
               help="videos per sampler/decoder call; one backward each, accumulated into the step (results do not "
                    "depend on it; lower it if a step runs out of memory)")
p.add_argument("--lr", type=float, default=None,
               help="AdamW learning rate (default 3e-4 on the toy model, 2e-4 otherwise: VADER; docs/flags.md)")
p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (VADER: 1.0)")
p.add_argument("--backprop-mode", default="last", choices=["last", "rand", "specific"],
               help="which sampler steps carry gradient: the last K, a random 1..K last ones per step, or from "
                    "--backprop-start on")
p.add_argument("--backprop-steps", type=int, default=1, help="K: sampler steps that carry gradient (VADER default 1)")
p.add_argument("--backprop-start", type=int, default=None,
               help="with --backprop-mode specific: the first step index carrying gradient")
p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=True,
               help="checkpoint every grad-carrying denoiser call")
p.add_argument("--decode-frames", default="all", choices=["one", "alternate", "all"],
               help="frames decoded for the reward: one random frame, every other frame, or all")
p.add_argument("--decoder-grad", default="prefix", choices=["prefix", "own"],
               help="Wan's causal VAE: the reward gradient flows through the decoded frames' whole causal prefix "
                    "(exact), or only through their own latent frames (the prefix keeps no activations: what lets 81 "
                    "frames fit)")
p.add_argument("--refl", action="store_true",
               help="ReFL baseline: reward of the one-step x0 prediction at a random late timestep")
p.add_argument("--refl-max-sigma", type=float, default=0.3,
               help="ReFL: late timesteps are drawn from (0, this] of the noise range")
p.add_argument("--lora-rank", type=int, default=16, help="LoRA rank on attention projections (0 = full fine-tune)")
p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: = rank)")
p.add_argument("--num-frames", type=int, default=None, help="frames per video (default: the model's)")
p.add_argument("--height", type=int, default=None, help="video height (default: the model's)")
p.add_argument("--width", type=int, default=None, help="video width (default: the model's)")
p.add_argument("--sample-steps", type=int, default=None,
               help="sampler steps (default: 10 on the toy model, 25 otherwise)")
p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the model's)")
p.add_argument("--guidance-2", type=float, default=None,
               help="Wan 2.2 A14B: guidance of the low-noise expert (default: the model's, 3.0; else --guidance)")
p.add_argument("--fps", type=float, default=None,
               help="frame rate of the generated clips, for rewards that sample by time (VideoScore2, VideoReward, "
                    "Qwen3-VL); default: the model's (Wan 16, CogVideoX 8, LTX 25)")
p.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"],
               help="autocast dtype; frozen weights (text encoder, VAE, base denoiser, reward) are stored in it, "
                    "trainable ones stay fp32 (fp16 adds dynamic loss scaling)")
p.add_argument("--fsdp", action="store_true",
               help="shard the denoiser with PyTorch FSDP2 over the torchrun ranks (for full fine-tunes and models of "
                    "5B and up; bf16 or fp32)")
p.add_argument("--cp", type=int, default=1,
               help="context parallelism: ranks sharing each video's tokens (diffusers' Ulysses attention; Wan)")
p.add_argument("--seed", type=int, default=0, help="seed of prompts, sampler noise, cut-offs")
p.add_argument("--out", default=None,
               help="run folder (default runs/vader_grad-<time>; with --resume, the resumed run's)")
p.add_argument("--eval-every", type=int, default=30, help="held-out evaluation interval (also at step 0 and the end)")
p.add_argument("--num-eval-prompts", type=int, default=52, help="how many held-out prompts to evaluate (one seed each)")
p.add_argument("--diversity-prompts", type=int, default=4,
               help="prompts sampled with --diversity-seeds seeds to measure diversity")
p.add_argument("--diversity-seeds", type=int, default=4, help="seeds per diversity prompt")
p.add_argument("--save-every", type=int, default=30, help="checkpoint interval (and at the end)")
p.add_argument("--resume", default=None,
               help="a run folder or checkpoint to continue: restores the weights, optimizer and RNG, and the run's "
                    "saved configuration (only --steps, --eval-every, --save-every, --sample-batch-size, --out (a "
                    "fork), --device may differ; README)")
p.add_argument("--track", action="store_true", help="mirror metrics to Weights & Biases (needs `pip install wandb`)")
p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")


def peak_memory_gb(device):
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS of the process (KiB on Linux)


def main(args):
    # ---- validate everything cheap before anything heavy loads ------------------------------
    checkpoint = common.resume_config(args, p, "vader_grad")  # --resume: the run's own configuration, checked first
    common.check_positive(args, "steps", "batch_size", "sample_batch_size", "num_eval_prompts", "eval_every",
                          "save_every", "sample_steps", "diversity_prompts", "diversity_seeds")
    common.check_track(args.track)
    model_path, family = models.resolve_model(args.model)
    models.fill_video_args(args, model_path, family)
    toy = family == "toy"
    args.lr = args.lr or (3e-4 if toy else 2e-4)
    args.sample_steps = args.sample_steps or (10 if toy else 25)
    rewards.parse_reward_spec(args.reward)
    if args.backprop_mode == "specific" and args.backprop_start is None:
        raise ValueError("--backprop-mode specific needs --backprop-start (the first step index carrying gradient)")
    if not 1 <= args.backprop_steps <= args.sample_steps:
        raise ValueError(f"--backprop-steps must be between 1 and --sample-steps ({args.sample_steps})")
    if args.backprop_mode == "specific" and not 0 <= args.backprop_start < args.sample_steps:
        raise ValueError(f"--backprop-start {args.backprop_start}: a sampler step index, 0 to {args.sample_steps - 1} "
                         f"(--sample-steps {args.sample_steps}); from it on every step carries gradient")
    if args.decoder_grad == "own" and family != "wan":
        raise ValueError(f"--decoder-grad own truncates Wan's causal VAE decoder; this model's family is {family}: "
                         "drop the flag (its decoder gradient is the whole decode)")
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
    per_rank = args.batch_size // d.world
    out = common.prepare_run_dir(args.out, "vader_grad", args.resume, main=d.main)

    # ---- model, reward, trainable weights -------------------------------------------------
    dtype = common.DTYPES[args.mixed_precision]  # frozen weights are stored in the autocast dtype
    model = models.load_model(args.model, d.device, dtype, denoiser_dtype=dtype if args.lora_rank else torch.float32,
                              context_mesh=d.mesh)
    reward_fn = rewards.load_reward(args.reward, d.device, dtype, fps=args.fps)
    if not reward_fn.differentiable:
        raise ValueError(f"reward {reward_fn.name} is not differentiable: VADER needs gradients to the pixels "
                         f"(use e.g. toy:quality, toy:text, aesthetic, hpsv2, pickscore)")
    torch.manual_seed(args.seed)  # LoRA's random init
    params = common.setup_trainable(model, args.lora_rank, args.lora_alpha)  # checkpointing: per sampler call below
    distributed.broadcast_params(params, d)
    if args.fsdp:  # FSDP2: each block, then the root; trainable weights, gradients and AdamW state sharded
        params = distributed.shard(model, args.mixed_precision)
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    autocast = common.autocast_context(args.mixed_precision, d.device)
    scaler = common.grad_scaler(args.mixed_precision, d.device)
    # (checkpoint None on --resume of a run that failed before its first checkpoint: it starts afresh)
    start_step = common.load_checkpoint(checkpoint, params, optimizer, scaler, model)[0] if checkpoint else 0
    video_kw = dict(num_frames=args.num_frames, height=args.height, width=args.width, steps=args.sample_steps,
                    guidance=args.guidance, guidance_2=args.guidance_2)
    if d.main:
        common.save_config(out, args, "vader_grad", model_path=model.path, family=family, reward_name=reward_fn.name,
                           world_size=d.world, heldout_prompts=len(eval_prompts))
    log = common.MetricsLogger(out, enabled=d.main, track=args.track, config=vars(args),  # (--resume: without the
                               resume_step=start_step if args.resume else None, final_step=args.steps)  # rows to redo)

    def evaluate(step):
        """Every reward dimension on held-out prompts, plus diversity: the per-pixel variance across
        seeds of the same prompt (VADER reports diversity falling as the reward is optimised)."""
        extra = None
        if family == "toy":
            extra = lambda v, ps: {"color_accuracy": toy_world.ToyReward().color_accuracy(v, ps)}  # noqa: E731
        means = common.evaluate(model, reward_fn, eval_prompts, args.seed, video_kw, d, autocast,
                                os.path.join(out, "samples", f"step-{step:06d}.mp4"), extra, args.sample_batch_size)
        div_prompts = eval_prompts[: args.diversity_prompts]
        _, videos = common.sample_and_score(model, [pr for pr in div_prompts for _ in range(args.diversity_seeds)],
                                            [common.seed_for(args.seed, "div", i, s) for i in range(len(div_prompts))
                                             for s in range(args.diversity_seeds)],
                                            args.sample_batch_size, lambda v, ps: {"v": v.flatten(1).cpu()}, video_kw,
                                            autocast)
        diversity = videos["v"].reshape(len(div_prompts), args.diversity_seeds, -1).var(1).mean().item()
        row = {"step": step, "eval": True, "eval/diversity": diversity} | {f"eval/{k}": v for k, v in means.items()}
        log.log(row)
        return row

    if start_step == 0:
        evaluate(0)
    bar = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, desc="vader", disable=not d.main)
    for step in bar:
        t0 = time.time()
        rng = random.Random(common.seed_for(args.seed, "step", step))  # prompts, cut-off, frames: same on every rank
        batch = [rng.choice(train_prompts) for _ in range(args.batch_size)]
        # which sampler steps carry gradient (VADER's backprop modes)
        if args.backprop_mode == "last":
            grad_from = args.sample_steps - args.backprop_steps
        elif args.backprop_mode == "rand":
            grad_from = args.sample_steps - rng.randint(1, args.backprop_steps)
        else:
            grad_from = args.backprop_start
        frames = {"one": [rng.randrange(args.num_frames)], "alternate": list(range(0, args.num_frames, 2)),
                  "all": None}[args.decode_frames]
        reward_sum, loss_sum = 0.0, 0.0
        for c in range(0, per_rank, args.sample_batch_size):  # micro-batches, one backward each (accumulated)
            gidx = [d.rank * per_rank + i for i in range(c, min(c + args.sample_batch_size, per_rank))]
            prompts, seeds = [batch[i] for i in gidx], [common.seed_for(args.seed, step, i) for i in gidx]
            with autocast:
                if args.refl:  # ReFL: sample without grad, re-noise to a late t, one grad-carrying x0 prediction
                    with torch.no_grad():
                        x0, _ = common.sample(model, prompts, seeds, **video_kw)
                    gens = [torch.Generator().manual_seed(common.seed_for(args.seed, "refl", step, i)) for i in gidx]
                    t = torch.cat([torch.rand(1, generator=g) for g in gens]).mul(args.refl_max_sigma).clamp(min=0.02)
                    t = (t * model.scheduler.config.num_train_timesteps).to(d.device)
                    if model.prediction != "flow":
                        t = t.long()
                    eps = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(d.device)
                    x_t, _ = common.noisy_and_target(model, x0, eps, t)
                    emb, mask = model.encode_prompts(prompts)
                    x0_hat = common.predicted_x0(model, x_t, model.denoise(x_t, t, emb, mask).float(), t)
                    videos = model.decode(x0_hat, frames, args.decoder_grad == "prefix")
                else:  # VADER: the sampler itself carries gradient through its last steps and the decoder
                    _, videos = common.sample(model, prompts, seeds, grad_from=grad_from,
                                              grad_checkpointing=args.grad_checkpointing, decode_frames=frames,
                                              decoder_prefix_grad=args.decoder_grad == "prefix", **video_kw)
            r = reward_fn(videos, prompts)["reward"].float()
            per_video = (args.reward_target - r).abs() if args.reward_target is not None else -r  # loss = -R
            # sum / global batch * world: after averaging over ranks this is the mean over the global batch
            scaler.scale(per_video.sum() / args.batch_size * d.world).backward()
            reward_sum += r.sum().item()
            loss_sum += per_video.sum().item()
        distributed.average_gradients(params, d)
        scaler.unscale_(optimizer)  # fp16: clip the true gradients (a no-op otherwise)
        grad_norm = distributed.clip_grad_norm(params, args.max_grad_norm)
        scaler.step(optimizer)  # skipped when fp16 gradients overflowed
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        dt = time.time() - t0
        stats = distributed.all_mean({"reward": reward_sum, "loss": loss_sum}, d)
        row = {"step": step + 1, "reward_mean": stats["reward"] * d.world / args.batch_size,
               "loss": stats["loss"] * d.world / args.batch_size, "grad_norm": grad_norm, "grad_from": grad_from,
               "sec_per_step": dt, "samples_per_s": args.batch_size / max(dt, 1e-9),
               "reward_queries": (step + 1) * args.batch_size, "peak_mem_gb": peak_memory_gb(d.device)}
        log.log(row)
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}", gnorm=f"{grad_norm:.2f}")
        if (step + 1) % args.eval_every == 0 and step + 1 != args.steps:
            evaluate(step + 1)
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            common.save_checkpoint(os.path.join(out, "checkpoints"), step + 1, model, params, optimizer,
                                   lora=args.lora_rank > 0, scaler=scaler, d=d)  # (every rank: FSDP writes shards)
    final = evaluate(args.steps)
    if d.main:
        first = next(r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if r.get("eval"))
        print(f"eval/reward: {first['eval/reward']:.4f} -> {final['eval/reward']:.4f}  ({reward_fn.name}, "
              f"{len(eval_prompts)} held-out prompts; diversity {first['eval/diversity']:.4f} -> "
              f"{final['eval/diversity']:.4f}; run folder {out})")
    if d.main and args.lora_rank:  # a model card beside the final LoRA, from the run's files
        models.write_model_card(out, "vader_grad", "VADER" + (" (ReFL baseline)" if args.refl else ""),
                                "arXiv 2407.08737", args.steps * args.batch_size)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return out


if __name__ == "__main__":
    main(common.parse_args(p))
