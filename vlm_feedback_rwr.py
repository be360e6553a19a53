"""Iterative reward-weighted regression (RWR) on binary yes/no feedback from a VLM judge.

Paper: "Improving Dynamic Object Interactions in Text-to-Video Generation with AI Feedback"
(arXiv 2412.02617). The KL-regularised objective max E[r] - beta KL(p || p_ref) has the optimum
p*(x|c) ~ p_ref(x|c) exp(r(x, c) / beta); projecting it with the forward KL gives RWR:
    L_RWR = E_{x ~ samples} [ w(x) * mse(f_theta(x_t, t, c), target(x0, eps, t)) ],
    w(x)  = exp(r / beta) / normaliser        (normalised per batch: mean weight 1)
With r in {0, 1} (the judge says yes/no) and small beta this is fine-tuning on accepted samples
only. Each round: (1) sample videos of dynamics prompts from the CURRENT model, (2) ask the judge one
yes/no question per video, (3) fine-tune on the weighted loss for --epochs passes, (4) the next round
samples from the fine-tuned model. `--loss dpo` trains Diffusion-DPO on (yes, no) pairs of the same
prompt instead (the paper's other projection), the reference being the round's starting model.
Reconstructed details: per-batch normalisation; a batch with no accepted video carries no
preference and is skipped (never trained on as if it were good).

    python vlm_feedback_rwr.py                                   # toy model + toy judge, CPU, ~10 minutes
    torchrun --nproc_per_node 8 vlm_feedback_rwr.py --model wan2.1-1.3b --judge vlm:qwen2.5-vl \
        --prompts p.txt --eval-prompts q.txt
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

p = argparse.ArgumentParser(description="Iterative RWR on binary VLM feedback",
                            formatter_class=common.HelpFormatter)
p.add_argument("--model", default="toy",
               help="'toy', an alias (wan2.1-1.3b, cogvideox-2b, ...), a diffusers folder or hub id")
p.add_argument("--judge", default="judge",
               help="binary judge spec: 'judge' (the toy world's), 'vlm[:qwen2.5-vl|qwen3-vl][@folder]' (P(yes) of a "
                    "local Qwen-VL) or 'api:<model>@<url>' (an OpenAI-compatible server); any --reward spec of the "
                    "other scripts also works (r = its score: RWR on a reward, as benchmarks/claims.py compares)")
p.add_argument("--question", default=None,
               help="yes/no question template with {prompt}; default: a dynamics question built from the prompt")
p.add_argument("--prompts", default="toy_dynamics_train",
               help=f"training prompts about object dynamics: a text file (UTF-8, one per line) or a built-in list: "
                    f"{common.prompt_lists()}")
p.add_argument("--eval-prompts", default="toy_dynamics_heldout",
               help="HELD-OUT dynamics prompts: a text file or a built-in list (as --prompts)")
p.add_argument("--rounds", type=int, default=3, help="sample -> judge -> fine-tune rounds")
p.add_argument("--prompts-per-round", type=int, default=32, help="prompts sampled each round (all ranks together)")
p.add_argument("--videos-per-prompt", type=int, default=4, help="videos sampled per prompt each round")
p.add_argument("--epochs", type=int, default=None,
               help="passes over the round's data (default 1 on the toy model, 2 otherwise; docs/flags.md)")
p.add_argument("--batch-size", type=int, default=16,
               help="videos per optimisation step, summed over ranks (--loss dpo: two per (yes, no) pair)")
p.add_argument("--loss", default="rwr", choices=["rwr", "dpo"],
               help="reward-weighted regression, or Diffusion-DPO on (yes, no) pairs")
p.add_argument("--beta", type=float, default=0.25, help="RWR temperature: w = exp(r / beta), normalised per batch")
p.add_argument("--dpo-beta", type=float, default=None, help="DPO beta (default 100 for flow models, 5000 for eps/v)")
p.add_argument("--keep-rounds", action="store_true",
               help="keep older rounds' data in the training set (saved in <out>/data/ for --resume)")
p.add_argument("--lr", type=float, default=None,
               help="AdamW learning rate; default 1e-4 with LoRA (the toy model too), 1e-5 for a full fine-tune "
                    "(docs/flags.md)")
p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping")
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
p.add_argument("--sample-batch-size", type=int, default=8,
               help="videos per sampler/decoder/judge call (results do not depend on it; lower it if sampling runs "
                    "out of memory)")
p.add_argument("--grad-checkpointing", action="store_true",
               help="gradient checkpointing in the denoiser (saves memory)")
p.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"],
               help="autocast dtype; frozen weights (text encoder, VAE, base denoiser, judge) are stored in it, "
                    "trainable ones stay fp32 (fp16 adds dynamic loss scaling)")
p.add_argument("--fsdp", action="store_true",
               help="shard the denoiser with PyTorch FSDP2 over the torchrun ranks (for full fine-tunes and models of "
                    "5B and up; bf16 or fp32)")
p.add_argument("--cp", type=int, default=1,
               help="context parallelism: ranks sharing each video's tokens (diffusers' Ulysses attention; Wan)")
p.add_argument("--seed", type=int, default=0, help="seed of prompts, videos, training noise")
p.add_argument("--out", default=None,
               help="run folder (default runs/vlm_feedback_rwr-<time>; with --resume, the resumed run's)")
p.add_argument("--eval-seeds", type=int, default=2, help="videos per held-out prompt in evaluation")
p.add_argument("--num-train-eval-prompts", type=int, default=32,
               help="training prompts also evaluated (pass rate on train)")
p.add_argument("--resume", default=None,
               help="a run folder or checkpoint to continue: restores the weights, optimizer, RNG, the judge's cached "
                    "answers and the run's saved configuration (only --rounds, --sample-batch-size, --out (a fork), "
                    "--device may differ; README)")
p.add_argument("--track", action="store_true", help="mirror metrics to Weights & Biases (needs `pip install wandb`)")
p.add_argument("--judge-timeout", type=float, default=60.0,
               help="api:<model>@<url> rewards: seconds to wait for each answer before retrying it")
p.add_argument("--judge-retries", type=int, default=4,
               help="api: rewards: retries of a timed-out, 429/5xx, malformed or error answer (back-off 1, 2, 4 ... "
                    "s); 401/403 are not retried")
p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")


def rwr_weights(r, beta):
    """w_i = exp(r_i / beta) / mean_j exp(r_j / beta) over the batch (softmax * B, mean 1), computed
    stably. A batch with no accepted video (all r = 0) has no preference in it: all weights 0."""
    if not (r > 0).any():
        return torch.zeros_like(r)
    return torch.softmax(r / beta, 0) * r.numel()


def category(prompt):
    try:
        return toy_world.CATEGORY[toy_world.parse_prompt(prompt)["motion"]]
    except ValueError:
        return "other"


def main(args):
    # ---- validate everything cheap before anything heavy loads ------------------------------
    # --resume: the run's own configuration, checked first
    checkpoint = common.resume_config(args, p, "vlm_feedback_rwr")
    common.check_positive(args, "rounds", "prompts_per_round", "videos_per_prompt", "batch_size", "sample_batch_size",
                          "eval_seeds", "epochs", "sample_steps")
    if args.loss == "dpo" and args.videos_per_prompt < 2:  # (no (yes, no) pair of one prompt: nothing trains)
        raise ValueError(f"--loss dpo pairs a yes and a no video of the same prompt: --videos-per-prompt "
                         f"{args.videos_per_prompt} gives none; pass 2 or more")
    common.check_track(args.track)
    model_path, family = models.resolve_model(args.model)
    models.fill_video_args(args, model_path, family)
    toy = family == "toy"
    args.lr = args.lr or (1e-4 if args.lora_rank else 1e-5)
    args.epochs = args.epochs or (1 if toy else 2)
    args.sample_steps = args.sample_steps or (10 if toy else 30)
    rewards.parse_reward_spec(args.judge)
    if args.question is not None and "{prompt}" not in args.question:
        raise ValueError("--question must contain {prompt}, e.g. 'Does the video show {prompt}? Answer yes or no.'")
    try:
        if args.question is not None:
            args.question.format(prompt="a red square falling")
    except (KeyError, IndexError, ValueError) as e:  # (it used to fail only at the first question, after loading)
        raise ValueError(f"--question {args.question!r}: {{prompt}} is the one field it may hold ({type(e).__name__}: "
                         f"{e}); write a literal brace twice, {{{{ or }}}}") from None
    train_prompts = common.load_prompts(args.prompts)
    eval_prompts = common.load_prompts(args.eval_prompts, "--eval-prompts")
    common.check_toy_prompts(args.judge, family, train_prompts, eval_prompts)
    d = distributed.setup_distributed(args.device, args.cp)
    if args.fsdp and args.mixed_precision == "fp16":
        raise ValueError(
                         "--fsdp runs in bf16 or fp32: use --mixed-precision bf16 (fp16 loss scaling is not wired to "
                         "FSDP2)")
    n_items = args.prompts_per_round * args.videos_per_prompt
    if n_items % d.world or args.batch_size % d.world:
        raise ValueError(f"prompts-per-round x videos-per-prompt ({n_items}) and --batch-size must be divisible "
                         f"by the number of ranks ({d.world})")
    if args.loss == "dpo" and args.batch_size % (2 * d.world):
        raise ValueError(f"--loss dpo: --batch-size counts videos, two per (yes, no) pair, so it must be divisible by "
                         f"2 x the number of ranks ({2 * d.world}); got {args.batch_size}")
    out = common.prepare_run_dir(args.out, "vlm_feedback_rwr", args.resume, need_checkpoint=False,
                                 main=d.main)  # (a cache-only resume needs no checkpoint)

    # ---- model, judge, trainable weights ---------------------------------------------------
    dtype = common.DTYPES[args.mixed_precision]  # frozen weights are stored in the autocast dtype
    model = models.load_model(args.model, d.device, dtype, denoiser_dtype=dtype if args.lora_rank else torch.float32,
                              context_mesh=d.mesh)
    args.dpo_beta = args.dpo_beta or (100.0 if model.prediction == "flow" else 5000.0)
    judge = rewards.load_reward(args.judge, d.device, dtype, fps=args.fps, judge_timeout=args.judge_timeout,
                                judge_retries=args.judge_retries)
    question = (lambda pr: args.question.format(prompt=pr)) if args.question else toy_world.default_question
    if hasattr(judge, "question_fn"):  # a VLM judge is asked exactly this question
        judge.question_fn = question
    torch.manual_seed(args.seed)  # LoRA's random init
    params = common.setup_trainable(model, args.lora_rank, args.lora_alpha, args.grad_checkpointing)
    distributed.broadcast_params(params, d)
    if args.fsdp:  # FSDP2: each block, then the root; trainable weights, gradients and AdamW state sharded
        params = distributed.shard(model, args.mixed_precision)
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    ref = common.Reference(params, model.experts) if args.loss == "dpo" else None
    autocast = common.autocast_context(args.mixed_precision, d.device)
    scaler = common.grad_scaler(args.mixed_precision, d.device)
    start_round, opt_steps = 0, 0
    if checkpoint:
        start_round, extra = common.load_checkpoint(checkpoint, params, optimizer, scaler, model)
        opt_steps = extra["opt_steps"]
    elif args.resume:  # crashed inside round 1: no checkpoint yet, but its judge answers are cached
        if d.main:
            print(f"no checkpoint in {args.resume}: restarting round 1, reusing the judge cache", flush=True)
    video_kw = dict(num_frames=args.num_frames, height=args.height, width=args.width, steps=args.sample_steps,
                    guidance=args.guidance, guidance_2=args.guidance_2)
    if d.main:
        common.save_config(out, args, "vlm_feedback_rwr", model_path=model.path, family=family, judge_name=judge.name,
                           world_size=d.world, heldout_prompts=len(eval_prompts))
    log = common.MetricsLogger(out, enabled=d.main, track=args.track, config=vars(args),  # (--resume: without the
                               resume_step=start_round if args.resume else None)  # rows to redo; see `logged` below)

    # the judge cache: one line per judged video, so a crashed round resumes without asking again
    os.makedirs(out, exist_ok=True)
    cache, cache_file = {}, os.path.join(out, f"judge_cache.rank{d.global_rank}.jsonl")  # (each process its own)
    if os.path.exists(cache_file):  # (a line torn by a crash mid-write is dropped: that video is asked again)
        cache = {row["key"]: row["yes"] for row in common.read_jsonl(cache_file, repair=True)}
    stats = {"judge_calls": 0, "judge_seconds": 0.0}

    def ask_judge(videos, prompts, keys):
        """Answers in {0, 1} for each video, cached by a key naming its purpose, round, prompt and seed."""
        todo = [i for i, k in enumerate(keys) if k not in cache]
        if todo:
            t0 = time.time()
            with torch.no_grad():
                # the toy judge reads the prompt; a VLM judge is asked `question(prompt)`
                answers = judge(videos[todo], [prompts[i] for i in todo])["reward"].float().cpu()
            stats["judge_calls"] += len(todo)
            stats["judge_seconds"] += time.time() - t0
            with open(cache_file, "a") as f:
                for i, a in zip(todo, answers.tolist()):
                    cache[keys[i]] = a
                    f.write(json.dumps({"key": keys[i], "yes": a, "question": question(prompts[i])}) + "\n")
        return torch.tensor([cache[k] for k in keys])

    toy_reward = toy_world.ToyReward(with_color_accuracy=True) if toy else None  # its scores hold color_accuracy

    def evaluate(rnd):
        """Judged pass rate on held-out and on (a slice of) training prompts, per category."""
        row = {"step": opt_steps, "round": rnd, "eval": True}
        for split, plist in (("eval", eval_prompts), ("train", train_prompts[: args.num_train_eval_prompts])):
            items = [(i, s) for i in range(len(plist)) for s in range(args.eval_seeds)]
            mine = items[d.rank::d.world]
            n_mine = len(mine)  # padded with repeats to the same count on every rank (FSDP: forwards are collectives)
            mine += mine[-1:] * (-(-len(items) // d.world) - n_mine)
            passed, dim_sums = {}, {}
            for c in range(0, len(mine), args.sample_batch_size):
                chunk = mine[c: c + args.sample_batch_size]
                prompts = [plist[i] for i, _ in chunk]
                with torch.no_grad(), autocast:
                    seeds = [common.seed_for(args.seed, split, i, s) for i, s in chunk]
                    _, videos = common.sample(model, prompts, seeds, **video_kw)
                yes = ask_judge(videos, prompts, [f"eval-{split}-r{rnd}-{i}-{s}-{plist[i]}" for i, s in chunk])
                keep = max(n_mine - c, 0)  # (the padding is not counted)
                for pr, y in list(zip(prompts, yes.tolist()))[:keep]:
                    for cat in ("all", category(pr)):
                        n, k = passed.get(cat, (0, 0))
                        passed[cat] = (n + 1, k + y)
                if toy and split == "eval":  # every toy dimension too: what the judge's feedback costs elsewhere
                    dims = toy_reward(videos, prompts)
                    for name, v in dims.items():
                        if name != "reward":
                            dim_sums[name] = dim_sums.get(name, 0.0) + v[:keep].float().sum().item() * d.world
                if c == 0 and split == "eval" and d.main:
                    common.save_video_grid(os.path.join(out, "samples", f"round-{rnd}.mp4"), videos[:8], prompts[:8])
            cats = ("all", "falling", "moving", "interaction")
            sums = distributed.all_mean({f"{cat}/{x}": passed.get(cat, (0, 0))[j] * d.world for cat in cats
                                         for j, x in enumerate(("n", "k"))}, d)
            for cat in cats:
                if sums[f"{cat}/n"] > 0:
                    name = f"{split}/pass_rate" + ("" if cat == "all" else f"/{cat}")
                    row[name] = sums[f"{cat}/k"] / sums[f"{cat}/n"]
            if toy and split == "eval":
                row |= {f"{split}/{k}": v / len(items) for k, v in distributed.all_mean(dim_sums, d).items()}
        log.log(row | distributed.all_mean(dict(stats), d))
        return row

    data, final = [], None  # the training set: (latent, prompt, answer, prompt-group id); the last evaluation
    if start_round == 0:
        evaluate(0)
    else:  # a crash between a round's checkpoint and its evaluation: evaluate that round now (rank 0 reads the log)
        logged = d.main and any(r.get("eval") and r.get("round") == start_round
                                for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))))
        if distributed.all_mean({"missing": float(d.main and not logged)}, d)["missing"] > 0:
            final = evaluate(start_round)
    data_folder = os.path.join(out, "data")  # --keep-rounds: every round's data, so a resume keeps it too
    if args.keep_rounds:
        for rnd in range(start_round):
            data += torch.load(os.path.join(data_folder, f"round-{rnd + 1}.pt"), weights_only=False)
    for rnd in range(start_round, args.rounds):
        # (1) sample a dataset from the CURRENT model, sharded across ranks
        rng = random.Random(common.seed_for(args.seed, "round", rnd))
        plist = rng.sample(train_prompts, min(args.prompts_per_round, len(train_prompts)))
        items = [(i, j) for i in range(len(plist)) for j in range(args.videos_per_prompt)]
        mine = items[d.rank * len(items) // d.world: (d.rank + 1) * len(items) // d.world]
        t0 = time.time()
        lat_chunks, yes_chunks = [], []
        for c in tqdm(range(0, len(mine), args.sample_batch_size),
                      desc=f"round {rnd + 1} sample+judge", disable=not d.main):
            chunk = mine[c: c + args.sample_batch_size]
            prompts = [plist[i] for i, _ in chunk]
            seeds = [common.seed_for(args.seed, "train", rnd, i, j) for i, j in chunk]
            with torch.no_grad(), autocast:
                latents, videos = common.sample(model, prompts, seeds, **video_kw)
            # (2) one yes/no question per video
            yes_chunks.append(ask_judge(videos, prompts, [f"data-r{rnd}-{i}-{j}-{plist[i]}" for i, j in chunk]))
            lat_chunks.append(latents)
        # every rank gets the whole round's data, so each global batch is the same on every rank
        latents = distributed.all_gather_tensor(torch.cat(lat_chunks), d)
        yes = distributed.all_gather_tensor(torch.cat(yes_chunks).to(d.device), d).cpu()
        new = [(latents[n].cpu(), plist[i], yes[n].item(), (rnd, i)) for n, (i, j) in enumerate(items)]
        if args.keep_rounds and d.main:
            os.makedirs(data_folder, exist_ok=True)
            torch.save(new, os.path.join(data_folder, f"round-{rnd + 1}.pt"))
        data = data + new if args.keep_rounds else new
        t_sample = time.time() - t0

        # (3) fine-tune on the weighted loss (or DPO on yes/no pairs) for --epochs passes
        if ref is not None:
            ref.update()  # DPO's reference: the model that generated this round's data
        for epoch in range(args.epochs):
            gen = torch.Generator().manual_seed(common.seed_for(args.seed, rnd, epoch))
            order = torch.randperm(len(data), generator=gen)
            if args.loss == "dpo":  # (yes, no) pairs of the same prompt, each video used once
                groups = {}
                for n in order.tolist():
                    groups.setdefault((data[n][3], data[n][2] > 0.5), []).append(n)
                pairs = [(w, l) for (g, ok), ws in groups.items() if ok for w, l in zip(ws, groups.get((g, False), []))]
                # --batch-size counts videos: batch_size / 2 pairs a step; the last, shorter batch is kept (pairs
                # are scarce: a round of mostly-yes or mostly-no prompts can give fewer than one full batch)
                batches = [pairs[b: b + args.batch_size // 2] for b in range(0, len(pairs), args.batch_size // 2)]
            else:
                batches = [order[b: b + args.batch_size].tolist() for b in range(0, len(order), args.batch_size)]
            ep_loss, ep_n, skipped = 0.0, 0, 0
            for b, batch in enumerate(batches):
                if len(batch) % d.world:  # equal shares keep every rank in step: a last, shorter batch is used
                    continue  # when it splits evenly over the ranks, else left out
                per_rank = len(batch) // d.world
                mine_b = batch[d.rank * per_rank: (d.rank + 1) * per_rank]
                ids = [i for pair in mine_b for i in pair] if args.loss == "dpo" else mine_b
                x0 = torch.stack([data[i][0] for i in ids]).to(d.device)
                gens = [torch.Generator().manual_seed(common.seed_for(args.seed, "noise", rnd, epoch, i)) for i in ids]
                t = torch.cat([common.sample_train_timesteps(model, 1, g) for g in gens]).to(d.device)
                eps = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(d.device)
                if args.loss == "dpo":  # one (t, eps) per pair, shared by its two members
                    t[1::2], eps[1::2] = t[0::2], eps[0::2]
                x_t, target = common.noisy_and_target(model, x0, eps, t)
                emb, mask = model.encode_prompts([data[i][1] for i in ids])
                if args.loss == "rwr":
                    r = torch.tensor([data[i][2] for i in batch])
                    w = rwr_weights(r, args.beta)  # w = exp(r / beta) / normaliser, over the GLOBAL batch
                    if w.sum() == 0:
                        skipped += 1
                        continue
                    w_mine = w[d.rank * per_rank: (d.rank + 1) * per_rank].to(d.device)
                    with autocast:
                        err = common.per_sample_mse(model.denoise(x_t, t, emb, mask), target)
                    loss = (w_mine * err).sum() / len(batch) * d.world  # L_RWR = E[w * mse]
                else:
                    with autocast:
                        ref_err = common.per_sample_mse(ref.forward(model.denoise, x_t, t, emb, mask), target)
                        err = common.per_sample_mse(model.denoise(x_t, t, emb, mask), target)
                    inside = -args.dpo_beta / 2 * ((err[0::2] - ref_err[0::2]) - (err[1::2] - ref_err[1::2]))
                    loss = -F.logsigmoid(inside).sum() / len(batch) * d.world  # (mean over the batch's pairs)
                scaler.scale(loss).backward()
                distributed.average_gradients(params, d)
                scaler.unscale_(optimizer)  # fp16: clip the true gradients (a no-op otherwise)
                distributed.clip_grad_norm(params, args.max_grad_norm)
                scaler.step(optimizer)  # skipped when fp16 gradients overflowed
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                opt_steps += 1
                ep_loss += loss.item()  # (the loss is already x world: all_mean below gives the global mean)
                ep_n += 1
            log.log({"step": opt_steps, "round": rnd + 1, "epoch": epoch + 1,
                     "loss": distributed.all_mean({"l": ep_loss / max(ep_n, 1)}, d)["l"], "batches": ep_n,
                     "batches_skipped_no_yes": skipped, "round_pass_rate": yes.mean().item(),
                     **({"pairs": len(pairs)} if args.loss == "dpo" else {}),
                     "sec_sample_and_judge": t_sample, "data_size": len(data)})
        # (4) the next round samples from the fine-tuned model
        common.save_checkpoint(os.path.join(out, "checkpoints"), rnd + 1, model, params, optimizer,  # (every rank:
                               extra={"opt_steps": opt_steps}, lora=args.lora_rank > 0, scaler=scaler,
                               d=d)  # FSDP shards)
        final = evaluate(rnd + 1)
    if d.main and args.rounds > start_round:
        first = next(r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if r.get("eval"))
        print(f"eval/pass_rate: {first['eval/pass_rate']:.3f} -> {final['eval/pass_rate']:.3f}  ({judge.name}, "
              f"{len(eval_prompts)} held-out prompts x {args.eval_seeds}; run folder {out})")
    if d.main and args.lora_rank and final is not None:  # a model card beside the final LoRA, from the run's files
        algorithm = "iterative RWR on binary VLM feedback" if args.loss == "rwr" else "DPO on binary VLM feedback"
        models.write_model_card(out, "vlm_feedback_rwr", algorithm, "arXiv 2412.02617",
                                args.rounds * args.prompts_per_round * args.videos_per_prompt)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return out


if __name__ == "__main__":
    main(common.parse_args(p))
