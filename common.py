"""What the algorithms share, family-agnostic (the families live in models.py, multi-GPU in distributed.py).

In reading order: the training math (timesteps, noising and targets, the x0 estimate, per-sample error, with
the equations), seeding and the batched CFG sampler (calling the model's own encode/denoise/step/decode),
precision, LoRA and the frozen DPO reference, prompts, evaluation, then the command line, the run folder,
metrics, video grids and checkpoints. Plain functions and two small classes, no framework.
Latents stay in the family's own layout; videos handed to rewards are [B, F, C, H, W] floats in [0, 1].
"""
import argparse
import contextlib
import datetime
import hashlib
import json
import os
import random
import re
import shutil

import torch

import distributed


# ----------------------------------------------------------------------------------------------
# The training math: timesteps, noising and targets, the x0 estimate, the per-sample error
# ----------------------------------------------------------------------------------------------
def sample_train_timesteps(model, n, generator, distribution="uniform"):
    """[n] training timesteps in the scheduler's units (flow: sigma*1000 with the sampler's shift;
    DDPM families: integer t over the training range). u ~ U(0, 1), or with "logit-normal"
    u = sigmoid(z), z ~ N(0, 1) (SD3's and the toy model's pre-training density: fewer draws at the ends)."""
    cfg = model.scheduler.config
    u = torch.rand(n, generator=generator) if distribution == "uniform" else \
        torch.sigmoid(torch.randn(n, generator=generator))
    if model.prediction == "flow":
        shift = cfg.get("flow_shift") or cfg.get("shift") or 1.0
        sigma = shift * u / (1 + (shift - 1) * u)
        return sigma.clamp(1e-3, 1.0) * cfg.num_train_timesteps
    return (u * cfg.num_train_timesteps).long().clamp(max=cfg.num_train_timesteps - 1)


def noisy_and_target(model, x0, eps, timestep):
    """x_t and the regression target for the family's prediction type (docs/ALGORITHMS.md table).
    `x0`, `eps` in the latent layout; `timestep` [B]."""
    B = x0.shape[0]
    view = (B,) + (1,) * (x0.dim() - 1)
    if model.prediction == "flow":  # x_t = (1 - s) x0 + s eps, target eps - x0
        s = (timestep.float() / model.scheduler.config.num_train_timesteps).view(view).to(x0)
        return (1 - s) * x0 + s * eps, eps - x0
    a = model.scheduler.alphas_cumprod.to(x0.device)[timestep.long()].view(view).to(x0)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    return xt, (a.sqrt() * eps - (1 - a).sqrt() * x0) if model.prediction == "v" else eps


def predicted_x0(model, x_t, pred, timestep):
    """The one-step clean estimate from a denoiser output (ReFL's x0 prediction)."""
    view = (x_t.shape[0],) + (1,) * (x_t.dim() - 1)
    if model.prediction == "flow":  # x_t = (1 - s) x0 + s eps, pred = eps - x0  =>  x0 = x_t - s pred
        return x_t - (timestep.float() / model.scheduler.config.num_train_timesteps).view(view).to(x_t) * pred
    a = model.scheduler.alphas_cumprod.to(x_t.device)[timestep.long()].view(view).to(x_t)
    if model.prediction == "v":
        return a.sqrt() * x_t - (1 - a).sqrt() * pred
    return (x_t - (1 - a).sqrt() * pred) / a.sqrt()


def per_sample_mse(pred, target):
    """mean over all non-batch dims: the `mse` of docs/ALGORITHMS.md."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


@torch.no_grad()
def implicit_accuracy(model, x0_w, x0_l, prompts, init, seed, ids, draws=4, autocast=None, distribution="uniform",
                      batch_size=8):
    """DPO's implicit accuracy against the INITIAL model, per pair: 1 where the policy has moved toward the winner
    relative to the loser, -[(e_w - e_w_init) - (e_l - e_l_init)] > 0, 0 where away, 0.5 on a tie (at step 0 the
    policy IS the initial model: chance); each pair's errors averaged over `draws` (t, eps) draws shared by its
    two members, seeded by the pair's global id (`ids`), so ranks and resumes do not change it. On pairs never
    trained on it measures a preference that generalises, where the training rows' accuracy (against the
    curriculum reference) can also reflect memorised pairs. `init`: a Reference holding the initial weights;
    `batch_size` pairs per forward."""
    out = []
    for c in range(0, x0_w.shape[0], batch_size):
        n, dev = len(x0_w[c: c + batch_size]), model.device
        x0 = torch.cat([x0_w[c: c + batch_size], x0_l[c: c + batch_size]]).to(dev)
        emb, mask = model.encode_prompts(list(prompts[c: c + batch_size]) * 2)
        inside = torch.zeros(n, device=dev)
        for k in range(draws):
            gens = [torch.Generator().manual_seed(seed_for(seed, "implicit-accuracy", *ids[c + i], k)) for i in range(n)]
            t = torch.cat([sample_train_timesteps(model, 1, g, distribution) for g in gens])
            eps = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens])
            t, eps = torch.cat([t, t]).to(dev), torch.cat([eps, eps]).to(dev)  # shared by w and l
            x_t, target = noisy_and_target(model, x0, eps, t)
            with (autocast or contextlib.nullcontext()):
                init_pred = init.forward(model.denoise, x_t, t, emb, mask)
                pred = model.denoise(x_t, t, emb, mask)
            e_w, e_l = per_sample_mse(pred, target).chunk(2)
            i_w, i_l = per_sample_mse(init_pred, target).chunk(2)
            inside -= (e_w - i_w) - (e_l - i_l)
        out += ((inside > 0).float() + 0.5 * (inside == 0).float()).tolist()
    return out


# ----------------------------------------------------------------------------------------------
# Seeding and the batched CFG sampler
# ----------------------------------------------------------------------------------------------
def seed_for(*keys):
    """A 63-bit seed from any tuple of ints/strings: candidate j of prompt i at step s gets
    seed_for(run_seed, s, i, j) on whichever rank draws it, so sharding never changes the samples."""
    return int.from_bytes(hashlib.sha256(repr(keys).encode()).digest()[:8], "little") >> 1


def sample(model, prompts, seeds, num_frames, height, width, steps, guidance, negative_prompt="",
           grad_from=None, grad_checkpointing=False, decode_frames=None, autocast=None, progress=False, guidance_2=None,
           decoder_prefix_grad=True, branch_at=None, branch_seeds=None):
    """Sample one video per (prompt, seed) in ONE batch, classifier-free guidance batched as [uncond; cond].
    Steps with index >= grad_from build a graph (VADER's truncated backprop); all others run under
    no_grad. Returns (final latents, videos [B, F, C, H, W] in [0, 1]). Given the same components and
    seeds it reproduces the stock diffusers pipeline (tests/test_common.py, test_families.py).
    `branch_at` = b (flow families): after step b the noise the trajectory carries is replaced by fresh
    noise drawn from `branch_seeds` (SDEdit from the step's x0 estimate). Videos given the same seed then
    share their trajectory up to step b (the layout) and differ only in what later steps decide."""
    from tqdm import tqdm
    B, dev = len(prompts), model.device
    shape = model.latent_shape(num_frames, height, width)
    # per-sample seeds (a candidate is reproducible alone); stochastic schedulers then draw their step noise
    # from the SAME generators, as the stock pipelines do
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    latents = torch.cat([torch.randn((1, *shape), generator=g) for g in gens]).to(dev)
    timesteps = model.set_timesteps(steps, shape)
    latents = latents * getattr(model.scheduler, "init_noise_sigma", 1.0)
    emb, mask = model.encode_prompts(list(prompts))
    nemb, nmask = model.encode_prompts([negative_prompt] * B)
    guidance_2 = guidance if guidance_2 is None else guidance_2  # the low-noise expert's (Wan 2.2 A14B)
    cfg = max(guidance, guidance_2) > 1.0
    emb_in = torch.cat([nemb, emb]) if cfg else emb
    mask_in = (torch.cat([nmask, mask]) if cfg else mask) if mask is not None else None
    grad_from = len(timesteps) if grad_from is None else grad_from
    if grad_checkpointing and not all(getattr(den, "gradient_checkpointing", True) for den in model.experts):
        # BOTH per-call (below) and per-block checkpointing, measured (benchmarks/vader_checkpointing.py): the
        # per-call one keeps only each step's input alive, so the blocks' inputs exist only while a step is
        # recomputed, never beside the decoder's activations, and do not grow with K. Peak 287 MiB at K = 1 and
        # 288 at K = 3, against 308 / 349 per-block only and 382 / 386 per-call only; the price is one extra
        # denoiser forward per grad-carrying step (of the ~30 a VADER step runs)
        for den in model.experts:
            den.enable_gradient_checkpointing()
    # under FSDP2, per block only: recomputing a whole sharded call inside the backward gathers every block's
    # weights at once (each is resharded only after its own backward): Wan 14B, 480x832x81, --decoder-grad own,
    # 8 ranks: 87.1 -> 62.1 GiB per rank (memory plan). The price, where the decoder's backward dominates instead:
    # the blocks' inputs stay saved beside it (+6 GiB at 17 frames, +26 GiB at 81 with every frame decoded)
    per_block_only = any(distributed.is_fsdp(den) for den in model.experts)
    sch = model.scheduler
    for i, t in enumerate(tqdm(timesteps, desc="sampling", leave=False, disable=not progress)):
        with torch.set_grad_enabled(i >= grad_from and torch.is_grad_enabled()), \
                (autocast or contextlib.nullcontext()):
            x_in = model.scale_model_input(torch.cat([latents, latents]) if cfg else latents, t)
            tt = t.expand(x_in.shape[0])
            if grad_checkpointing and i >= grad_from and not per_block_only:
                pred = torch.utils.checkpoint.checkpoint(model.denoise, x_in, tt, emb_in, mask_in, use_reentrant=False)
            else:
                pred = model.denoise(x_in, tt, emb_in, mask_in)
            pred = pred.float()
            if cfg:
                uncond, cond = pred.chunk(2)
                g = guidance if model.denoiser_2 is None or t >= model.boundary else guidance_2
                pred = uncond + g * (cond - uncond)
            x_prev, latents = latents, model.step(pred, t, latents, i, timesteps, gens)
            if i == branch_at:  # (flow samplers only: check_branch) x_t = (1 - s) x0 + s eps: swap the eps_hat
                s, s_next = sch.sigmas[i].item(), sch.sigmas[i + 1].item()  # the step carried for the branch's own
                x_b = getattr(sch, "last_sample", None)  # UniPC: its corrected x_b; Euler: the step's input
                eps_hat = x_prev.float() + (1 - s) * pred if x_b is None else \
                    (x_b.float() - (1 - s) * sch.model_outputs[-1].float()) / s  # (its x0 estimate)
                eps = torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(int(b)))
                                 for b in branch_seeds]).to(eps_hat)
                latents = latents + (s_next * (eps - eps_hat)).to(latents)
                if x_b is not None:  # UniPC's corrector rebuilds x_{b+1} from x_b: branch x_b there too
                    sch.last_sample = x_b + (s * (eps - eps_hat)).to(x_b)
    with torch.set_grad_enabled(grad_from < len(timesteps) and torch.is_grad_enabled()):
        videos = model.decode(latents, decode_frames, decoder_prefix_grad)
    return latents, videos


@torch.no_grad()
def sample_and_score(model, prompts, seeds, batch_size, score, video_kw, autocast=None, branch_seeds=None):
    """`sample` in micro-batches of `batch_size` videos per sampler/decoder call (--sample-batch-size), each
    micro-batch scored by `score(videos, prompts) -> {name: [n] tensor}` as soon as it is decoded, so only
    latents and scores are kept. Per-sample seeds make the result that of one big call. Returns
    (latents, {name: [len(prompts)] tensor})."""
    latents, scores = [], {}
    for c in range(0, len(prompts), batch_size):
        batch = prompts[c: c + batch_size]
        with (autocast or contextlib.nullcontext()):
            branch = {"branch_seeds": branch_seeds[c: c + batch_size]} if branch_seeds else {}
            lat, videos = sample(model, batch, seeds[c: c + batch_size], **video_kw, **branch)
        for k, v in score(videos, batch).items():
            scores.setdefault(k, []).append(v.float())
        latents.append(lat)
    return torch.cat(latents), {k: torch.cat(v) for k, v in scores.items()}


# ----------------------------------------------------------------------------------------------
# Precision
# ----------------------------------------------------------------------------------------------
DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # --mixed-precision -> frozen dtype


def autocast_context(mixed_precision, device):
    if mixed_precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type,
                          dtype=torch.bfloat16 if mixed_precision == "bf16" else torch.float16)


def grad_scaler(mixed_precision, device):
    """Dynamic loss scaling for fp16, whose small gradients underflow to zero without it (a no-op for bf16
    and fp32). The loops scale the loss, average gradients across ranks, THEN unscale: every rank sees the
    same averaged gradients, so every rank skips the same overflowing steps."""
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=mixed_precision == "fp16")
    # create the scale now (GradScaler does it lazily in its first `scale`): a rank with no DPO pair on its
    # first step (or the first after a resume) never calls `scale` but must still `unscale_` with the others
    scaler.scale(torch.zeros((), device=device))
    return scaler


# ----------------------------------------------------------------------------------------------
# Trainable weights: LoRA or full fine-tune, and the frozen reference
# ----------------------------------------------------------------------------------------------
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # attention projections, same names in every family


def setup_trainable(model, lora_rank, lora_alpha=None, grad_checkpointing=False):
    """LoRA (peft) on the attention projections when rank > 0, else every denoiser weight.
    Returns the list of trainable parameters (kept in float32)."""
    params = []
    for den in model.experts:  # Wan 2.2 A14B: both experts get an adapter (or are both fine-tuned)
        if lora_rank > 0:
            from peft import LoraConfig, inject_adapter_in_model
            den.requires_grad_(False)
            config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha or lora_rank, target_modules=LORA_TARGETS,
                                init_lora_weights=True)
            if hasattr(den, "add_adapter"):
                den.add_adapter(config)
            else:  # ModelScope's UNet3DConditionModel has no diffusers PeftAdapterMixin: inject with peft directly
                inject_adapter_in_model(config, den)
        else:
            den.requires_grad_(True)
        params += [p for p in den.parameters() if p.requires_grad]
        if grad_checkpointing and not getattr(den, "_supports_gradient_checkpointing", False):
            raise ValueError(f"--grad-checkpointing: diffusers' {type(den).__name__} does not support gradient "
                             f"checkpointing; drop the flag for this model")
        if grad_checkpointing:
            den.enable_gradient_checkpointing()
        den.train()
    for p in params:
        p.data = p.data.float()
    return params


class Reference:
    """The frozen reference f_ref of DPO, stored as a copy of the TRAINABLE weights only (the LoRA
    matrices, or every weight when fully fine-tuning): the reference forward swaps them in under
    no_grad and back out, so a LoRA run pays for one extra adapter, not a second model.
    `update()` is OnlineVPO's curriculum step ref <- policy. Call `forward` BEFORE the policy's
    forward of the same step (swapping weights under a live autograd graph would corrupt it)."""

    def __init__(self, params, modules=()):
        self.params, self.modules = params, modules  # modules: the denoisers (FSDP2 roots under --fsdp)
        self.weights = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self):
        for w, p in zip(self.weights, self.params):
            w.copy_(p)

    @torch.no_grad()
    def forward(self, fn, *args):
        saved = [p.detach().clone() for p in self.params]
        for p, w in zip(self.params, self.weights):
            p.copy_(w)
        # autocast caches its low-precision cast of every trainable weight for the whole region and does not
        # see in-place swaps: without clearing, the policy forward that follows reuses the REFERENCE's casts
        # (policy == reference, inside = 0, loss = log 2 under bf16), or the reference reuses the policy's.
        # Likewise FSDP2 keeps a root module's weights gathered after its forward: reshard them on each swap
        torch.clear_autocast_cache()
        distributed.reshard(self.modules)
        try:
            return fn(*args)
        finally:
            for p, s in zip(self.params, saved):
                p.copy_(s)
            torch.clear_autocast_cache()
            distributed.reshard(self.modules)


# ----------------------------------------------------------------------------------------------
# Prompts and evaluation
# ----------------------------------------------------------------------------------------------
def load_prompts(spec, flag="--prompts"):
    """A built-in list name (toy_train, toy_heldout, toy_dynamics_train, toy_dynamics_heldout) or a
    text file with one prompt per line (UTF-8); `flag` names the option in error messages."""
    import toy_world
    if spec in toy_world.PROMPT_LISTS:
        return list(toy_world.PROMPT_LISTS[spec])
    try:
        with open(spec, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise FileNotFoundError(f"{flag}: cannot read prompt file {spec!r} ({e.strerror}): pass a text file with one "
                                f"prompt per line, or one of {sorted(toy_world.PROMPT_LISTS)}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{flag}: prompt file {spec!r} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                         f"{e.start}): save it as UTF-8") from None
    if not prompts:
        raise ValueError(f"{flag}: prompt file {spec!r} is empty")
    return prompts


def check_toy_prompts(spec, family, prompts, eval_prompts):
    """Refuse, before anything loads, a prompt outside the toy grammar wherever one is read as such: the toy
    rewards and judge (a `toy` or `judge` term in `spec`) read colour, shape and motion from every caption, and
    the toy model's evaluation scores colour accuracy on the held-out ones. (It used to fail at the first reward
    call, after the step-0 evaluation had been paid for.)"""
    import rewards
    import toy_world
    toy_scored = any(name in ("toy", "judge") for _, name, _, _ in rewards.parse_reward_spec(spec))
    for flag, plist in (("--prompts", prompts if toy_scored else []),
                        ("--eval-prompts", eval_prompts if toy_scored or family == "toy" else [])):
        for prompt in plist:
            try:
                toy_world.parse_prompt(prompt)
            except ValueError as e:
                raise ValueError(f"{flag}: {e}. The toy rewards, the toy judge and the toy model's evaluation read "
                                 f"the caption, so every prompt must follow that grammar (see toy_world.py)") from None


@torch.no_grad()
def evaluate(model, reward_fn, prompts, seed, video_kw, d, autocast=None, grid_path=None, extra=None, batch_size=8,
             seeds_per_prompt=1):
    """Mean of every reward dimension over `prompts`, `seeds_per_prompt` fixed seeds each (more seeds: a lower
    noise floor), sharded over ranks, sampled in micro-batches of `batch_size`. `extra(videos, prompts)` may
    add per-video figures; the first 8 videos are written to `grid_path`."""
    seeds = [seed_for(seed, "eval", i, *([k] if k else [])) for k in range(seeds_per_prompt) for i in range(len(prompts))]
    prompts = list(prompts) * seeds_per_prompt  # (seed 0 of each prompt first: the grid shows one video per prompt)
    mine = list(range(d.rank, len(prompts), d.world))
    n = len(mine)  # padded with repeats to the same count on every rank (under FSDP each forward is a collective)
    mine += [mine[-1] if mine else 0] * (-(-len(prompts) // d.world) - n)
    grid = []

    def score(videos, batch):
        grid.extend(zip(videos[: 8 - len(grid)].cpu(), batch))
        return dict(reward_fn(videos, batch)) | (extra(videos, batch) if extra else {})

    _, scores = sample_and_score(model, [prompts[i] for i in mine], [seeds[i] for i in mine],
                                 batch_size, score, video_kw, autocast)
    if grid_path and d.main:
        save_video_grid(grid_path, torch.stack([v for v, _ in grid]), [p for _, p in grid])
    totals = distributed.all_mean({k: v[:n].sum().item() * d.world for k, v in scores.items()} | {"n": n * d.world}, d)
    return {k: v / totals["n"] for k, v in totals.items() if k != "n"}


# ----------------------------------------------------------------------------------------------
# The command line: help, resume, early checks
# ----------------------------------------------------------------------------------------------
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each default said once: argparse's "(default: X)" is left off where the help text already
    says what the default is ("default: the model's"), and where X is None or False (a value resolved later, a
    switch that is off), which would only print a second, meaningless default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


def prompt_lists():
    """The built-in prompt lists, for --help."""
    import toy_world
    return ", ".join(toy_world.PROMPT_LISTS)


def parse_args(parser, argv=None):
    """parser.parse_args, plus `args.given`: the flags the command line typed, so --resume can tell a typed
    `--batch-size 8` from the default 8. (A second parse into a namespace holding a marker for every flag:
    argparse fills in a default only where the namespace has no value.)"""
    args = parser.parse_args(argv)
    unset = object()
    typed = parser.parse_args(argv, argparse.Namespace(**{k: unset for k in vars(args)}))
    args.given = sorted(k for k, v in vars(typed).items() if v is not unset)
    return args


# --resume: flags that are this command's own (where the run continues and on what), never taken from the run
RESUME_OWN = {"resume", "out", "device", "fsdp", "cp", "track"}
# --resume: flags that may differ from the run's, as they do not change what it trains or how it is evaluated:
# --steps/--rounds extend it, the intervals say how often it evaluates and saves, the rest trade memory or time
RESUME_SAFE = {"steps", "rounds", "eval_every", "save_every", "sample_batch_size", "offload_frozen",
               "grad_checkpointing", "judge_timeout", "judge_retries"}
SCRIPT_FLAGS = {"vlm_feedback_rwr": "judge", "gran_dpo": "patch_grid", "vader_grad": "backprop_mode",
                "online_vpo": "num_candidates", "flow_grpo": "group_size"}  # a flag only that script has (checked in this order)


def script_of(cfg):
    """The script that wrote a run's config.json: its "script" (written since issue #31), else the script in
    the command it records, else told by a flag only that script has."""
    if cfg.get("script"):
        return cfg["script"]
    m = re.search(r"(\w+)\.py", cfg.get("command") or "")
    return m.group(1) if m else next((s for s, k in SCRIPT_FLAGS.items() if k in cfg), None)


def resume_config(args, parser, script, predates=None):
    """--resume continues the run that was started. Every flag the command did not give takes the run's saved
    value (config.json); a given flag may differ from it only where that leaves the run the same (RESUME_SAFE;
    RESUME_OWN are this command's own: --out forks the run); any other given flag that differs is refused by
    name, as is another script's run, a damaged checkpoint, or a sharded one without --fsdp (and the reverse).
    Call it first in main(): it reads only small files. `args.given` lists the flags the command typed
    (common.parse_args); where it is missing (main() called from Python with a whole namespace) a flag counts
    as given where it differs from the parser's default. `predates`: {flag: the value a run older than the flag
    ran with}, where that is not the parser's default (online_vpo's levers: the paper recipe's). Returns the
    checkpoint to load, or None: a new run, or one that failed before its first checkpoint, which then starts
    afresh from its saved configuration."""
    given = vars(args).pop("given", None)
    if not args.resume:
        return None
    checkpoint = resume_checkpoint(args.resume)
    defaults = vars(parser.parse_args([]))
    length = "rounds" if "rounds" in defaults else "steps"
    config = os.path.join(run_folder_of(args.resume), "config.json")
    saved = json.load(open(config)) if os.path.exists(config) else {}
    if saved and script_of(saved) != script:  # (gran_dpo on an online_vpo run compared different rewards)
        other = script_of(saved) or "another script"
        raise ValueError(f"--resume {args.resume}: that run was started by {other}.py, not {script}.py: resume it "
                         f"with {other}.py")
    if given is None:
        given = [k for k in defaults if getattr(args, k, defaults[k]) != defaults[k]]
    changed = []
    for k in defaults:
        if k in RESUME_OWN:
            continue
        if k not in saved:  # a flag newer than the run: the run ran with its default, so only that continues it
            ran = (predates or {}).get(k, defaults[k])
            if k in given and k not in RESUME_SAFE and getattr(args, k) != ran:
                changed.append(f"--{k.replace('_', '-')} {getattr(args, k)} (the run predates the flag: it ran "
                               f"without it)")
            continue
        if k not in given:
            setattr(args, k, saved[k])
        elif k not in RESUME_SAFE and getattr(args, k) != saved[k]:
            changed.append(f"--{k.replace('_', '-')} {getattr(args, k)} (the run's: {saved[k]})")
    if changed:
        raise ValueError(f"--resume {args.resume} continues the run as it was started, and {', '.join(changed)} "
                         f"would change it: drop {'them' if len(changed) > 1 else 'it'}, or start a new run "
                         f"(no --resume, a new --out)")
    reached = int(os.path.basename(checkpoint).split("-")[-1]) if checkpoint else 0
    in_place = args.out is None or os.path.realpath(args.out) == os.path.realpath(run_folder_of(args.resume))
    if checkpoint and in_place and checkpoint != latest_checkpoint(run_folder_of(args.resume)):
        raise ValueError(f"--resume {args.resume}: the run has a later checkpoint "
                         f"({latest_checkpoint(run_folder_of(args.resume))}); continuing from an earlier one in the "
                         f"same folder would mix two histories: fork it into a new folder with --out")
    if getattr(args, length) < reached:
        raise ValueError(f"--{length} {getattr(args, length)}: the run's checkpoint {checkpoint} is already at "
                         f"{length[:-1]} {reached}: pass --{length} {reached} or more (or none: the run's own)")
    sharded = checkpoint is not None and os.path.isdir(os.path.join(checkpoint, "sharded"))
    if checkpoint and sharded != bool(getattr(args, "fsdp", False)):
        raise ValueError(f"--resume {args.resume}: the checkpoint was {'' if sharded else 'not '}written with --fsdp; "
                         f"resume it the same way ({'add' if sharded else 'drop'} --fsdp)")
    return checkpoint


def check_branch(branch_at, sample_steps, model_path):
    """--branch-at b needs a later step to branch into, and a flow-matching sampler (its noise is swapped in
    x_t = (1 - s) x0 + s eps); checked from the scheduler's config, before anything loads."""
    if branch_at is None:
        return
    if not 0 <= branch_at < sample_steps - 1:
        raise ValueError(f"--branch-at {branch_at}: the candidates branch after a sampler step that has a later one: "
                         f"pass 0 to {sample_steps - 2} (--sample-steps {sample_steps}), or drop it (independent samples)")
    if not is_flow_sampler(model_path):
        raise ValueError(f"--branch-at: {scheduler_config(model_path).get('_class_name')} is not a flow-matching "
                         f"sampler (CogVideoX, ModelScope): drop --branch-at for this model")


def scheduler_config(model_path):
    """The model folder's scheduler config (no weights read), or {} where it has none."""
    folder = os.path.join(model_path, "scheduler")
    configs = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".json")] if os.path.isdir(folder) else []
    return json.load(open(configs[0])) if configs else {}


def is_flow_sampler(model_path):
    """Whether the model samples a flow (x_t = (1 - s) x0 + s eps): a FlowMatch scheduler or flow sigmas."""
    cfg = scheduler_config(model_path)
    return not cfg or "FlowMatch" in cfg.get("_class_name", "") or bool(cfg.get("use_flow_sigmas"))


def check_positive(args, *names):
    """Refuse a count, size or interval below 1 (--batch-size 0, --save-every 0, --rounds -1 ...) before
    anything loads: each used to fail inside torch, late, or not at all."""
    for k in names:
        value = getattr(args, k)
        if value is not None and value < 1:
            raise ValueError(f"--{k.replace('_', '-')} {value}: must be a whole number, 1 or more")


def check_track(track):
    """--track needs wandb: refused up front rather than after the model has loaded."""
    if track:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ValueError("--track mirrors the metrics to Weights & Biases, which is not installed here: "
                             "`pip install wandb` (and `wandb login`), or drop --track") from None


def check_writable(out):
    """Refuse an --out that cannot be created or written before anything loads, creating nothing: the nearest
    folder that exists on its path must be a folder this process may write in."""
    path = os.path.abspath(out)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise ValueError(f"--out {out}: {path} is a file, not a folder: pass a folder path for the run")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: cannot write in {path} (permission denied): pass a folder you can write to")


_LOCKS = {}  # run folder -> its open .lock file: held until the process exits


def lock_run_dir(out):
    """An advisory lock on <out>/.lock (fcntl.flock), so that a second process never writes into a live run; the
    kernel releases it when the process ends, however it ends (kill -9 included), so it never goes stale. The
    file holds the PID of the process that holds it, for the message. Taken again by the same process, it is
    already held (a test, a notebook: main() called again on the same folder)."""
    import fcntl
    key = os.path.realpath(out)
    if key in _LOCKS:
        return
    os.makedirs(out, exist_ok=True)
    f = open(os.path.join(out, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "unknown"
        f.close()
        raise RuntimeError(f"{out} is in use by another process (PID {pid}, from {os.path.join(out, '.lock')}): "
                           f"two processes writing one run would corrupt it; wait for it to end, or pass another "
                           f"--out") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _LOCKS[key] = f


# ----------------------------------------------------------------------------------------------
# Run folder: config, metrics, videos, checkpoints
# ----------------------------------------------------------------------------------------------
def run_folder_of(path):
    """The run folder that holds `path` (a run folder, its checkpoints/ folder or one checkpoint in it)."""
    path = os.path.normpath(path)
    if os.path.exists(os.path.join(path, "state.pt")) or os.path.basename(path).startswith("step-"):
        path = os.path.dirname(path)
    return os.path.dirname(path) if os.path.basename(path) == "checkpoints" else path


def resume_checkpoint(resume):
    """The checkpoint --resume names (one checkpoint, or a run folder's newest), checked readable; None where a
    run folder has no checkpoint yet but a config.json: a run that failed before its first checkpoint, which
    --resume starts afresh from that configuration."""
    if not os.path.isdir(run_folder_of(resume)):
        raise FileNotFoundError(f"--resume {resume!r}: no such run folder")
    try:
        checkpoint = latest_checkpoint(resume)
    except FileNotFoundError:
        named_one = os.path.basename(os.path.normpath(resume)).startswith("step-")
        if named_one or not os.path.exists(os.path.join(run_folder_of(resume), "config.json")):
            raise
        return None
    state = os.path.join(checkpoint, "state.pt")
    import zipfile  # torch.save writes a zip, its directory at the end: a file cut short has none
    try:
        zipfile.ZipFile(state).close()
    except (zipfile.BadZipFile, OSError) as e:
        folder = os.path.dirname(checkpoint)
        earlier = sorted(os.path.join(folder, d) for d in os.listdir(folder)
                         if d.startswith("step-") and not d.endswith(".tmp") and d < os.path.basename(checkpoint))
        raise ValueError(f"--resume: {state} is damaged ({e}; cut short by a crash or a full disk?): resume from an "
                         f"earlier checkpoint ({', '.join(earlier) or 'there is none'}) or start the run again") from None
    return checkpoint


def prepare_run_dir(out, script, resume, need_checkpoint=True, main=True):
    """The run folder (default runs/<script>-<time>; with --resume, the resumed run's own folder). Refuses
    to write into an existing run unless --resume names it, so nothing already written is lost; checks the
    checkpoint exists up front (or, for a run that failed before its first one, its config.json), that the
    folder can be written, and locks it (the main rank: see lock_run_dir). --resume into another --out forks
    the run: see `fork_run`."""
    if resume and need_checkpoint:
        resume_checkpoint(resume)
    if out is None and resume:
        out = run_folder_of(resume)
    if out is None:  # (one name for every rank: each rank's clock may be a second apart)
        out = [os.path.join("runs", f"{script}-{datetime.datetime.now():%Y%m%d-%H%M%S}")]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast_object_list(out, src=0)
        out = out[0]
    fork = bool(resume) and os.path.abspath(run_folder_of(resume)) != os.path.abspath(out)  # see fork_run
    if fork and not os.path.isdir(run_folder_of(resume)):
        raise FileNotFoundError(f"--resume {resume!r}: no such run folder")
    if (resume is None or fork) and os.path.exists(os.path.join(out, "metrics.jsonl")):
        raise FileExistsError(f"{out} already holds a run: pass --resume {out} to continue it, or a new --out")
    check_writable(out)
    if main:
        lock_run_dir(out)
    if fork:
        distributed.barrier()  # (every rank has checked before rank 0 writes, and reads only once it has)
        if main:
            fork_run(resume, out)
        distributed.barrier()
    return out


def fork_run(resume, out):
    """--resume from a checkpoint of another run folder into a new --out: the new folder starts as the
    source run's record up to that checkpoint (metrics rows, samples, the checkpoint itself, RWR's kept
    rounds and judge answers), so its before/after line, model card and own later --resume see the whole
    run. metrics.jsonl is written last, so a fork that crashes part-way is simply started again."""
    src = run_folder_of(resume)
    try:
        ck = latest_checkpoint(resume)
        k = int(os.path.basename(ck).split("-")[-1])  # the step (RWR: round) it reached
    except FileNotFoundError:
        ck, k = None, 0  # (RWR's cache-only resume: it restarts round 1 and logs its own first evaluation)
    if ck:  # hard links where the file system allows: no second copy of a large sharded checkpoint
        copy = os.path.join(out, "checkpoints", os.path.basename(ck))
        shutil.rmtree(copy, ignore_errors=True)  # (left by a fork that crashed part-way)
        shutil.copytree(ck, copy, copy_function=_link_or_copy)
    for sub in ("samples", "data"):  # samples/step-<k>.mp4 or round-<k>.mp4; data/round-<k>.pt
        for name in os.listdir(os.path.join(src, sub)) if os.path.isdir(os.path.join(src, sub)) else []:
            number = name.split("-")[-1].split(".")[0]
            if number.isdigit() and int(number) <= k:
                os.makedirs(os.path.join(out, sub), exist_ok=True)
                shutil.copy(os.path.join(src, sub, name), os.path.join(out, sub, name))
    for name in os.listdir(src):  # (answers are keyed by round, prompt and seed, as in a same-folder resume)
        if name.startswith("judge_cache."):
            shutil.copy(os.path.join(src, name), os.path.join(out, name))
    metrics = os.path.join(src, "metrics.jsonl")
    rows = resumed_rows(read_jsonl(metrics), k) if k and os.path.exists(metrics) else []
    write_jsonl(os.path.join(out, "metrics.jsonl"), rows)


def _link_or_copy(a, b):
    try:
        os.link(a, b)
    except OSError:
        shutil.copy2(a, b)


def save_json(path, obj):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(path + ".tmp", path)


def save_config(out, args, script, **resolved):
    """config.json: every argument, what the run resolved (model folder, family, reward, ...), the script and
    the command that started the run. A resumed run keeps that command and adds its own to "resumed_with"."""
    cfg = vars(args) | resolved | {"script": script, "command": command_line(script)}
    started = os.path.join(run_folder_of(args.resume), "config.json") if args.resume else None
    if started and os.path.exists(started):
        with open(started) as f:
            before = json.load(f)
        cfg |= {"command": before.get("command"),
                "resumed_with": before.get("resumed_with", []) + [c for c in [command_line(script)] if c]}
    save_json(os.path.join(out, "config.json"), cfg)


def read_jsonl(path, repair=False):
    """The rows of a JSON-lines file, less any line that does not parse: the torn last line of a crash in the
    middle of a write (or that line with the next append glued to it). `repair` rewrites the file without them,
    so that the next append starts on a line of its own."""
    with open(path) as f:
        text = f.read()
    rows, torn = [], False
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            torn = torn or bool(line.strip())
    if repair and (torn or (text and not text.endswith("\n"))):
        write_jsonl(path, rows)
    return rows


def write_jsonl(path, rows):
    """Rows as JSON lines, written to a temporary file and renamed: never half a file."""
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(path + ".tmp", path)


def resumed_rows(rows, k, final_step=None):
    """The metrics rows a run resumed from its checkpoint at step k (RWR: round k) keeps: those logged up to k,
    as it logs everything after k again; less an evaluation at k that it repeats: k = 0 (it starts afresh) or
    k = final_step (a finished run evaluates its last step again)."""
    def at(r):
        return r["round"] if "round" in r else r["step"]
    redo = k == 0 or k == final_step
    return [r for r in rows if at(r) < k or (at(r) == k and not (redo and r.get("eval")))]


class MetricsLogger:
    """metrics.jsonl, one JSON object per line; optional W&B mirror (`--track`). On --resume (`resume_step`: the
    checkpoint's step or round, 0 for a run started afresh) the rows logged after the checkpoint are dropped
    first, as the resumed run logs them again (`final_step`: see resumed_rows)."""

    def __init__(self, folder, enabled=True, track=False, config=None, resume_step=None, final_step=None):
        self.enabled, self.wandb = enabled, None
        if enabled:
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, "metrics.jsonl")
            if resume_step is not None and os.path.exists(path):
                write_jsonl(path, resumed_rows(read_jsonl(path), resume_step, final_step))
            self.file = open(path, "a")
            if track:
                import wandb  # optional dependency, only with --track
                self.wandb = wandb.init(project="cleanvideoalign", config=config, dir=folder)

    def log(self, row):
        if not self.enabled:
            return
        self.file.write(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}) + "\n")
        self.file.flush()
        if self.wandb:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=row.get("step"))


def save_video_grid(path, videos, captions, fps=4, scale=None):
    """One row per clip: the video (upscaled when tiny) with its caption written beside it.
    MP4 through imageio-ffmpeg, GIF when the path ends in .gif or ffmpeg is unavailable."""
    import imageio.v2 as imageio
    import numpy as np
    from PIL import Image, ImageDraw

    videos = videos.detach().float().cpu().clamp(0, 1)
    N, F, C, H, W = videos.shape
    scale = scale or max(1, 128 // max(H, W))
    text_w, row_h = 300, H * scale + 4
    frames = []
    for f in range(F):
        canvas = Image.new("RGB", (W * scale + text_w, row_h * N), (24, 24, 24))
        draw = ImageDraw.Draw(canvas)
        for i in range(N):
            img = (videos[i, f].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
            canvas.paste(Image.fromarray(img).resize((W * scale, H * scale), Image.NEAREST), (0, i * row_h))
            draw.text((W * scale + 8, i * row_h + 4), captions[i][:48], fill=(235, 235, 235))
            draw.text((W * scale + 8, i * row_h + 18), captions[i][48:96], fill=(235, 235, 235))
        frames.append(np.asarray(canvas))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if path.endswith(".mp4"):
        try:
            imageio.mimwrite(path, frames, fps=fps, macro_block_size=1)
            return path
        except Exception:  # no ffmpeg binary: fall back to a GIF next to it
            path = path[:-4] + ".gif"
    imageio.mimwrite(path, frames, duration=1000 / fps, loop=0)
    return path


def rng_state():
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder, step, model, params, optimizer, extra=None, lora=True, scaler=None, d=None):
    """checkpoints/step-<k>/ with trainable weights, optimizer, RNG, step (+ `extra`), and the LoRA in
    diffusers format; written to a temporary folder and renamed, so a crash never leaves half of one.
    Call it on every rank: rank 0 writes, except that under FSDP every rank writes its shards of the
    weights, optimizer state and any list of tensors in `extra` (the DPO reference) with
    torch.distributed.checkpoint."""
    main, sharded = d is None or d.main, distributed.is_sharded(params)
    if not (main or sharded):
        return None
    final = os.path.join(folder, f"step-{step:06d}")
    tmp = final + ".tmp"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    state = {"step": step, "rng": rng_state(), "extra": extra or {}, "scaler": scaler.state_dict() if scaler else {}}
    if sharded:
        distributed.barrier()
        tensors = {k: v for k, v in state["extra"].items() if isinstance(v, list) and v and torch.is_tensor(v[0])}
        distributed.save(tmp, model, params, optimizer, tensors)
        state["extra"] = {k: v for k, v in state["extra"].items() if k not in tensors} | {"sharded": sorted(tensors)}
    else:
        state |= {"params": [p.detach().cpu() for p in params], "optimizer": optimizer.state_dict()}
    if lora:
        model.save_lora(os.path.join(tmp, "lora"), main)
    if main:
        torch.save(state, os.path.join(tmp, "state.pt"))
    if sharded:  # every rank's shards are written before the folder is renamed, and renamed before anyone goes on
        distributed.barrier()
    if main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    if sharded:
        distributed.barrier()
    return final


def latest_checkpoint(path):
    """`path` is a checkpoint folder, or a run folder / checkpoints folder: take its newest step."""
    if os.path.exists(os.path.join(path, "state.pt")):
        return path
    for folder in (os.path.join(path, "checkpoints"), path):
        if os.path.isdir(folder):
            steps = sorted(d for d in os.listdir(folder) if d.startswith("step-") and not d.endswith(".tmp"))
            if steps:
                return os.path.join(folder, steps[-1])
    raise FileNotFoundError(f"--resume {path!r}: no checkpoint (state.pt) found there")


def load_checkpoint(path, params, optimizer, scaler=None, model=None, like=None):
    """Restore trainable weights, optimizer, RNG (and the fp16 loss scale); returns (step, extra). A sharded
    (FSDP) checkpoint also restores, in place, the lists of tensors in `like` (e.g. {"ref": ref.weights})."""
    folder = latest_checkpoint(path)
    state = torch.load(os.path.join(folder, "state.pt"), weights_only=False, map_location="cpu")
    if distributed.is_sharded(params) != ("sharded" in state["extra"]):
        raise ValueError(f"--resume {path}: the checkpoint was {'' if 'sharded' in state['extra'] else 'not '}written "
                         f"with --fsdp; resume it the same way")
    if "sharded" in state["extra"]:
        distributed.load(folder, model, params, optimizer, {k: like[k] for k in state["extra"]["sharded"]})
        extra = {k: v for k, v in state["extra"].items() if k != "sharded"} | {k: like[k] for k in state["extra"]["sharded"]}
    else:
        with torch.no_grad():
            for p, v in zip(params, state["params"]):
                p.copy_(v)
        optimizer.load_state_dict(state["optimizer"])
        extra = state["extra"]
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return state["step"], extra


def command_line(script):
    """The command that started this run (for config.json and the model card), or None when main() was
    called from Python (tests, notebooks)."""
    import shlex
    import sys
    if os.path.basename(sys.argv[0]) != f"{script}.py":
        return None
    launcher = f"torchrun --nproc_per_node {os.environ['LOCAL_WORLD_SIZE']}" if "LOCAL_WORLD_SIZE" in os.environ else "python"
    return " ".join([launcher, f"{script}.py"] + [shlex.quote(a) for a in sys.argv[1:]])
