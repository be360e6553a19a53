"""Pre-train the toy world's base model: a tiny pixel-space WanTransformer3DModel with flow matching.

Reproduces the weights shipped under assets/toy (diffusers folder layout, loaded by
`models.load_model("toy")` through the ordinary `from_pretrained`). Videos are rendered on the fly
by toy_world.render from the TRAIN prompts only; 10% of captions are dropped for classifier-free
guidance. The text encoder (a tiny UMT5 over a word-level tokenizer) is trained jointly here and
frozen afterwards, like a real T5.

    python pretrain_toy.py --stop-at 11000      # the shipped base's recipe: ~4 h on 2 CPU cores (resumable),
                                                # writes runs/toy
    python pretrain_toy.py --stop-at 11000 --out assets/toy --overwrite   # the same, replacing the shipped base
    python pretrain_toy.py --steps 200 --out /tmp/toy   # a quick smoke run
Writes runs/toy by default (not committed); writing over shipped files (anything under assets/: the shipped
base, the candidates' checkpoints) takes --overwrite. Resumes from <out>/../toy_pretrain_ckpt.pt when it
exists (`--resume`). The defaults are the shipped base's
recipe (its flags are recorded in assets/toy/pretrain_log.json); the other options (a smaller or larger
denoiser, --timesteps uniform, --device cuda, --init-from to fine-tune) are for building another one
(docs/toy_world.md: the candidates tried).
"""
import argparse
import json
import math
import os
import random
import time

import torch
from tqdm import tqdm

import toy_world

ROOT = os.path.dirname(os.path.abspath(__file__))
SHIPPED = [os.path.join(ROOT, "assets")]  # committed files: overwritten only with --overwrite

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--out", default=os.path.join(ROOT, "runs", "toy"),
               help="where the diffusers-layout folder is written (default runs/toy, not committed)")
p.add_argument("--overwrite", action="store_true",
               help="allow writing over shipped files (under assets/: e.g. --out assets/toy, the shipped base)")
p.add_argument("--steps", type=int, default=12000, help="optimisation steps (the length of the learning-rate schedule)")
p.add_argument("--stop-at", type=int, default=None,
               help="stop after this step and ship its EMA weights; the schedule still spans --steps (default: "
                    "--steps)")
p.add_argument("--batch-size", type=int, default=32, help="videos per step")
p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (cosine decay, 200 warm-up steps)")
p.add_argument("--ema", type=float, default=0.998, help="EMA decay of the shipped weights")
p.add_argument("--num-frames", type=int, default=8, help="frames per video")
p.add_argument("--size", type=int, default=32, help="height = width in pixels")
p.add_argument("--cfg-dropout", type=float, default=0.1, help="fraction of captions replaced by the empty prompt")
p.add_argument("--seed", type=int, default=0, help="seed of weights, data and noise")
p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
p.add_argument("--resume", action="store_true", help="continue from the checkpoint beside --out")
p.add_argument("--save-every", type=int, default=250, help="checkpoint interval (steps)")
p.add_argument("--ckpt", default=None, help="training checkpoint path (default: toy_pretrain_ckpt.pt beside --out)")
p.add_argument("--sampling", default="balanced", choices=["uniform", "balanced"],
               help=
               "balanced over the motion categories (the shipped base) or uniform over the train prompts (2/3 are "
                   "pushes)")
p.add_argument("--heads", type=int, default=4, help="attention heads of the denoiser (heads x head-dim = 128)")
p.add_argument("--head-dim", type=int, default=32,
               help="attention head dim; Wan's 3D RoPE gives H and W 2*(head_dim//6) dims each")
p.add_argument("--layers", type=int, default=6, help="transformer blocks of the denoiser")
p.add_argument("--ffn-dim", type=int, default=512, help="feed-forward width of the denoiser")
p.add_argument("--patch", type=int, default=4,
               help="spatial patch size of the denoiser (tokens = frames x (size/patch)^2)")
p.add_argument("--patch-t", type=int, default=2,
               help="temporal patch size: 2 puts two frames in a token (half the tokens)")
p.add_argument("--shift", type=float, default=2.0,
               help=
               "flow shift of the noise levels, in training and in the shipped sampler (>1: more time at high "
                   "noise)")
p.add_argument("--device", default="cpu",
               help="cpu or cuda (data and noise are drawn on the CPU: the same run on either)")
p.add_argument("--timesteps", default="logit-normal", choices=["logit-normal", "uniform"],
               help=
               "training noise levels: SD3's logit-normal (the shipped base; rarely sigma > 0.9) or uniform in "
                   "[0, 1]")
p.add_argument("--init-from", default=None,
               help="start from this training checkpoint's weights (fresh optimiser and schedule)")


BY_CATEGORY = [[p for p in toy_world.TRAIN_PROMPTS if toy_world.CATEGORY[toy_world.parse_prompt(p)["motion"]] == c]
               for c in sorted(set(toy_world.CATEGORY.values()))]


def build_components(seed, heads, head_dim, layers, ffn_dim, patch, patch_t, shift):
    """Fresh tokenizer, text encoder, denoiser and scheduler of the toy model (random weights)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(toy_world.VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>", model_max_length=16)
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                               num_heads=4, relative_attention_num_buckets=8,
                                               relative_attention_max_distance=16, dropout_rate=0.0,
                                               pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    denoiser = WanTransformer3DModel(patch_size=(patch_t, patch, patch), num_attention_heads=heads,
                                     attention_head_dim=head_dim,
                                     in_channels=3, out_channels=3, text_dim=32, freq_dim=64, ffn_dim=ffn_dim,
                                     num_layers=layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                     rope_max_seq_len=64)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    return tokenizer, text_encoder, denoiser, scheduler


def encode(tokenizer, text_encoder, prompts, max_len=16):
    """Wan's prompt encoding (WanPipeline._get_t5_prompt_embeds): embeddings past the text are zeroed."""
    t = tokenizer(prompts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
    t = t.to(text_encoder.device)
    emb = text_encoder(t.input_ids, t.attention_mask).last_hidden_state
    return emb * t.attention_mask[..., None]


def shipped_files(path):
    """`path` when it is an existing file, or a folder with files, under a shipped folder (SHIPPED), else None.
    This script's own working checkpoint (toy_pretrain_ckpt.pt[.opt], git-ignored) is not a shipped file."""
    real = os.path.realpath(path)
    if not any(real.startswith(os.path.realpath(d) + os.sep) for d in SHIPPED):
        return None
    own = lambda f: os.path.basename(f).startswith("toy_pretrain_ckpt.pt")  # noqa: E731
    if os.path.isfile(real) and not own(real):
        return path
    if os.path.isdir(real) and any(not own(f) for _, _, files in os.walk(real) for f in files):
        return path
    return None


def refuse_to_overwrite_shipped(args, ckpt_path):
    """--out, or a checkpoint the run will write, that holds shipped files needs --overwrite."""
    if args.overwrite:
        return
    hits = [f for f in (shipped_files(args.out), shipped_files(ckpt_path), shipped_files(ckpt_path + ".opt")) if f]
    if hits:
        raise SystemExit(f"pretrain_toy: {', '.join(hits)} holds shipped files (committed under assets/), which this "
                         f"run would overwrite: write elsewhere (the default --out is runs/toy, not committed) or pass "
                         f"--overwrite to replace them (e.g. `python pretrain_toy.py --stop-at 11000 --out assets/toy "
                         f"--overwrite` rebuilds the shipped base)")


def main(args):
    ckpt_path = args.ckpt or os.path.join(os.path.dirname(os.path.abspath(args.out)), "toy_pretrain_ckpt.pt")
    refuse_to_overwrite_shipped(args, ckpt_path)
    if args.stop_at is not None and not 0 <= args.stop_at <= args.steps:
        raise ValueError(f"--stop-at {args.stop_at} must lie within the schedule: 0 to --steps ({args.steps})")
    torch.set_num_threads(args.threads)
    tokenizer, text_encoder, denoiser, scheduler = build_components(args.seed, args.heads, args.head_dim, args.layers,
                                                                    args.ffn_dim, args.patch, args.patch_t, args.shift)
    dev = torch.device(args.device)
    text_encoder.to(dev)
    denoiser.to(dev)
    params = list(denoiser.parameters()) + list(text_encoder.parameters())
    print(f"denoiser {sum(p.numel() for p in denoiser.parameters()) / 1e6:.3f} M params, "
          f"text encoder {sum(p.numel() for p in text_encoder.parameters()) / 1e6:.3f} M")
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 200) * 0.5 * (1 + math.cos(math.pi * min(s / max(args.steps, 1), 1.0))))
    ema = [p.detach().clone() for p in params]
    os.makedirs(os.path.dirname(ckpt_path), exist_ok=True)
    start, losses = 0, []
    if args.init_from:
        ck = torch.load(args.init_from, weights_only=False, map_location="cpu")
        for p_, v, e in zip(params, ck["ema"], ema):  # the shipped (EMA) weights
            p_.data.copy_(v)
            e.copy_(v)
        print(f"initialised from {args.init_from} (step {ck['step']})")
    if args.resume and os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, weights_only=False, map_location="cpu")
        for p_, v in zip(params, ck["params"]):
            p_.data.copy_(v)
        for e, v in zip(ema, ck["ema"]):
            e.copy_(v)
        opt.load_state_dict(torch.load(ckpt_path + ".opt", weights_only=False, map_location="cpu"))
        sched.load_state_dict(ck["sched"])
        start, losses = ck["step"], ck["losses"]
        if args.stop_at is not None and start > args.stop_at:
            raise ValueError(f"{ckpt_path} is at step {start}, past --stop-at {args.stop_at}: its weights are not "
                             f"step {args.stop_at}'s; use a checkpoint saved at or before it")
        print(f"resumed at step {start}")
    t0 = time.time()
    stop = args.steps if args.stop_at is None else args.stop_at
    bar = tqdm(range(start, stop), initial=start, total=stop, desc="pretrain toy")
    for step in bar:
        rng = random.Random(args.seed * 1_000_003 + step)  # data, dropout and noise are a function of the step
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        if args.sampling == "balanced":  # a motion category first (moving, falling, still, interaction), then a prompt
            prompts = [rng.choice(rng.choice(BY_CATEGORY)) for _ in range(args.batch_size)]
        else:
            prompts = [rng.choice(toy_world.TRAIN_PROMPTS) for _ in range(args.batch_size)]
        x0 = toy_world.render(prompts, args.num_frames, args.size, args.size, seed=rng.randrange(2**31))
        x0 = (x0.permute(0, 2, 1, 3, 4) * 2 - 1).to(dev)  # [B, C, F, H, W] in [-1, 1]
        captions = ["" if rng.random() < args.cfg_dropout else p for p in prompts]
        if args.timesteps == "uniform":  # every noise level equally: the layout is decided at sigma near 1
            sigma = torch.rand(args.batch_size, generator=g)
        else:
            sigma = torch.sigmoid(torch.randn(args.batch_size, generator=g))  # logit-normal t (SD3)
        sigma = args.shift * sigma / (1 + (args.shift - 1) * sigma)  # the sampler's shift (SD3 eq. 23), 1 = none
        sigma, eps = sigma.to(dev), torch.randn(x0.shape, generator=g).to(dev)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * eps  # flow matching: x_t = (1 - s) x0 + s eps, target eps - x0
        pred = denoiser(xt, timestep=sigma * 1000, encoder_hidden_states=encode(tokenizer, text_encoder, captions),
                        return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for e, p_ in zip(ema, params):
                e.lerp_(p_.detach(), 1 - args.ema)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        if (step + 1) % args.save_every == 0 or step + 1 == stop:
            ck = {"params": [p_.detach() for p_ in params], "ema": ema,
                  "sched": sched.state_dict(), "step": step + 1, "losses": losses}
            # AdamW's moments in a file of their own (<ckpt>.opt): neither half of a larger model's checkpoint
            # passes git's comfortable file size, so a run can be committed and resumed in another session
            for path, obj in ((ckpt_path + ".opt", opt.state_dict()), (ckpt_path, ck)):
                torch.save(obj, path + ".tmp")
                os.replace(path + ".tmp", path)  # atomic: a crash never leaves half a file (weights written last)
    # ship the EMA weights in the ordinary diffusers / transformers folder layout
    with torch.no_grad():
        for p_, e in zip(params, ema):
            p_.copy_(e)
    os.makedirs(args.out, exist_ok=True)
    text_encoder.cpu()
    denoiser.cpu()
    tokenizer.save_pretrained(os.path.join(args.out, "tokenizer"))
    text_encoder.save_pretrained(os.path.join(args.out, "text_encoder"))
    denoiser.save_pretrained(os.path.join(args.out, "transformer"))
    scheduler.save_pretrained(os.path.join(args.out, "scheduler"))
    with open(os.path.join(args.out, "model_index.json"), "w") as f:
        json.dump({"_class_name": "WanPipeline", "_diffusers_version": "0.42.1", "cleanvideoalign_toy": True,
                   "pixel_space": True, "num_frames": args.num_frames, "height": args.size, "width": args.size,
                   "max_sequence_length": 16, "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
                   "text_encoder": ["transformers", "UMT5EncoderModel"],
                   "transformer": ["diffusers", "WanTransformer3DModel"],
                   "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "vae": [None, None]}, f, indent=2)
    final_loss = sum(losses[-50:]) / len(losses[-50:]) if losses else float("nan")
    with open(os.path.join(args.out, "pretrain_log.json"), "w") as f:
        json.dump({"args": vars(args), "step": max(start, stop), "final_loss_avg50": final_loss,
                   "loss_every_100": losses[::100], "seconds_this_session": time.time() - t0}, f)
    print(f"saved {args.out}; final loss {final_loss:.4f}")


if __name__ == "__main__":
    main(p.parse_args())
