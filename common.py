"""What the four algorithms share: loading a text-to-video model, prompt encoding, one batched CFG
sampler for every family, training noise/targets, LoRA, distributed set-up, and run-folder IO.

Plain functions and one bundle class, no framework. Supported families (diffusers layouts):
  toy        our pixel-space WanTransformer3DModel (assets/toy), flow matching, [B, C, F, H, W]
  wan        Wan 2.1 / 2.2 (WanTransformer3DModel + AutoencoderKLWan), flow matching, [B, C, F, H, W]
  cogvideox  CogVideoX 1.0 / 1.5 (DDIM or DPM, v-prediction), [B, F, C, H, W]
  ltx        LTX-Video (flow matching, tokens packed inside the denoiser call), [B, C, F, H, W] outside
  modelscope ModelScope UNet3DConditionModel (eps-prediction, 2D VAE per frame), [B, C, F, H, W]
  hunyuan15  HunyuanVideo 1.5 (Qwen2.5-VL + ByT5 text, HunyuanVideo15Transformer3DModel + its causal VAE),
             flow matching, [B, C, F, H, W]
Latents stay in the family's own layout everywhere; `denoise` is the one place that knows the
family's call convention. Videos handed to rewards are always [B, F, C, H, W] floats in [0, 1].
"""
import argparse
import collections
import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import random
import re
import shutil

import torch
import torch.distributed as dist

import sharding

HERE = os.path.dirname(os.path.abspath(__file__))
TOY_PATH = os.path.join(HERE, "assets", "toy")
MODEL_ALIASES = {  # short names for the public checkpoints (hub ids; pass a local folder on offline machines)
    "toy": os.environ.get("CLEANVIDEOALIGN_TOY", TOY_PATH),
    "wan2.1-1.3b": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    "wan2.1-14b": "Wan-AI/Wan2.1-T2V-14B-Diffusers",
    "wan2.2-5b": "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
    "wan2.2-a14b": "Wan-AI/Wan2.2-T2V-A14B-Diffusers",  # two experts: transformer (high noise), transformer_2 (low)
    "cogvideox-2b": "THUDM/CogVideoX-2b",
    "cogvideox-5b": "THUDM/CogVideoX-5b",
    "cogvideox1.5-5b": "THUDM/CogVideoX1.5-5B",
    "ltx-video": "Lightricks/LTX-Video",
    "modelscope-1.7b": "ali-vilab/text-to-video-ms-1.7b",
    "hunyuanvideo1.5": "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v",
}
PIPELINE_FAMILY = {"WanPipeline": "wan", "CogVideoXPipeline": "cogvideox", "LTXPipeline": "ltx",
                   "TextToVideoSDPipeline": "modelscope"}
DENOISER_FOLDER = {"toy": "transformer", "wan": "transformer", "cogvideox": "transformer", "ltx": "transformer",
                   "modelscope": "unet"}
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # attention projections, same names in every family
# HunyuanVideo 1.5 (HunyuanVideo15Pipeline): the second flow-matching DiT family with two text encoders
PIPELINE_FAMILY["HunyuanVideo15Pipeline"] = "hunyuan15"
DENOISER_FOLDER["hunyuan15"] = "transformer"
HUNYUAN15_IMAGE_TOKENS = 729  # HunyuanVideo15Pipeline.vision_num_semantic_tokens: the (all-zero) image tokens of T2V


# ----------------------------------------------------------------------------------------------
# Resolving and loading a model
# ----------------------------------------------------------------------------------------------
def resolve_model(name_or_path):
    """(folder, family) from an alias, a local folder or a hub id, reading only model_index.json:
    cheap, so scripts call it before anything heavy loads and fail early with a useful message."""
    path = MODEL_ALIASES.get(name_or_path, name_or_path)
    if not os.path.isdir(path):
        looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
        if not looks_like_hub_id:
            raise FileNotFoundError(f"model folder {path!r} does not exist: pass a local diffusers folder, "
                                    f"a hub id, or one of {sorted(MODEL_ALIASES)}")
        try:  # a hub id: users with network access get it downloaded; offline machines get a clear error
            from huggingface_hub import snapshot_download
            path = snapshot_download(path)
        except Exception as e:
            raise FileNotFoundError(f"could not fetch {name_or_path!r} ({type(e).__name__}). This machine cannot "
                                    f"download weights: pass a local folder with the model (diffusers layout) "
                                    f"to --model, or use --model toy") from None
    index_file = os.path.join(path, "model_index.json")
    if not os.path.exists(index_file):
        raise FileNotFoundError(f"{path!r} has no model_index.json: --model wants a diffusers pipeline folder "
                                f"(tokenizer/, text_encoder/, transformer/ or unet/, scheduler/, vae/)")
    with open(index_file) as f:
        index = json.load(f)
    if index.get("cleanvideoalign_toy"):
        family = "toy"
    elif index.get("_class_name") in PIPELINE_FAMILY:
        family = PIPELINE_FAMILY[index["_class_name"]]
    else:
        raise ValueError(f"unsupported model family {index.get('_class_name')!r} in {path}: supported are "
                         f"the toy model and {sorted(PIPELINE_FAMILY)} (Wan, CogVideoX, LTX-Video, ModelScope, "
                         f"HunyuanVideo 1.5)")
    folder = os.path.join(path, DENOISER_FOLDER[family])
    if not os.path.isdir(folder) or not any(f.endswith((".safetensors", ".bin")) for f in os.listdir(folder)):
        raise FileNotFoundError(f"no weights in {folder}: the model folder is incomplete (download it fully, "
                                f"or run `python pretrain_toy.py --stop-at 11000 --out assets/toy --overwrite` to rebuild the toy model: about 4 h on 2 CPU cores)")
    return path, family


def check_video_size(family, num_frames, height, width, toy_patch=(1, 4, 4)):
    """Raise early for a frame count / resolution the family's VAE and patching cannot take (the toy model:
    its denoiser's patch size, `toy_patch` = (frames, rows, columns) per token)."""
    pt = toy_patch[0]
    rules = {  # (frame rule, its text, spatial multiple)
        "toy": (lambda f: f >= 2 and f % pt == 0, "at least 2" + (f" and a multiple of {pt} (the model's "
                                                                   f"{pt} frames per token)" if pt > 1 else ""),
                toy_patch[1]),
        "wan": (lambda f: (f - 1) % 4 == 0, "4k+1 (e.g. 17, 33, 81)", 16),
        "cogvideox": (lambda f: (f - 1) % 4 == 0, "4k+1 (e.g. 13, 49)", 16),
        "ltx": (lambda f: (f - 1) % 8 == 0, "8k+1 (e.g. 9, 17, 161)", 32),
        "modelscope": (lambda f: f >= 1, "at least 1", 8),
        # VAE: 4x in time (causal), 16x in space; the DiT's patches are 1x1x1 (patch_size, patch_size_t)
        "hunyuan15": (lambda f: (f - 1) % 4 == 0, "4k+1 (e.g. 33, 121)", 16),
    }
    ok, text, mult = rules[family]
    if not ok(num_frames):
        raise ValueError(f"--num-frames {num_frames} is not valid for {family}: it must be {text}")
    if height % mult or width % mult:
        raise ValueError(f"--height/--width {height}x{width} must be multiples of {mult} for {family}")


FAMILY_DEFAULTS = {  # video size, sampler steps, guidance and frame rate (the family's own) that suit each family
    "wan": dict(num_frames=33, height=480, width=832, sample_steps=30, guidance=5.0, fps=16),
    "cogvideox": dict(num_frames=49, height=480, width=720, sample_steps=30, guidance=6.0, fps=8),
    "ltx": dict(num_frames=65, height=480, width=704, sample_steps=30, guidance=3.0, fps=25),
    "modelscope": dict(num_frames=16, height=256, width=256, sample_steps=25, guidance=9.0, fps=8),
    # HunyuanVideo15Pipeline's own defaults: 121 frames, 50 steps, 480x848 (its 16:9 bucket for target_size 640),
    # guidance 6.0 (the 480p/720p guider), 24 fps; model_defaults reads the checkpoint's guider and target size
    "hunyuan15": dict(num_frames=121, height=480, width=848, sample_steps=50, guidance=6.0, fps=24),
}


def model_defaults(path, family):
    """The family's defaults (the toy model's come from its model_index.json); no weights are read."""
    if family == "hunyuan15":  # guidance lives in the guider's config (1.0 for the step-distilled checkpoints),
        defaults = dict(FAMILY_DEFAULTS[family])  # the default size in the transformer's target_size (480p / 720p)
        guider, transformer = (os.path.join(path, *name) for name in (("guider", "guider_config.json"),
                                                                       ("transformer", "config.json")))
        if os.path.exists(guider):
            with open(guider) as f:
                defaults["guidance"] = float(json.load(f).get("guidance_scale", defaults["guidance"]))
        if os.path.exists(transformer):
            from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor
            with open(transformer) as f:
                target = json.load(f).get("target_size", 640)
            defaults["height"], defaults["width"] = HunyuanVideo15ImageProcessor(
                vae_scale_factor=16).calculate_default_height_width(9, 16, target)  # the pipeline's 16:9 default
        return defaults
    with open(os.path.join(path, "model_index.json")) as f:
        index = json.load(f)
    if family == "wan" and index.get("transformer_2", [None])[0] is not None:  # Wan 2.2 A14B (its sample_guide_scale)
        return dict(FAMILY_DEFAULTS["wan"], guidance=4.0, guidance_2=3.0)
    if family == "wan" and index.get("expand_timesteps"):  # Wan 2.2 TI2V 5B renders 24 fps
        return dict(FAMILY_DEFAULTS["wan"], fps=24)
    if family != "toy":
        return dict(FAMILY_DEFAULTS[family])
    return dict(num_frames=index.get("num_frames", 8), height=index.get("height", 32), width=index.get("width", 32),
                sample_steps=10, guidance=3.0, fps=index.get("fps", 8))


def fill_video_args(args, path, family):
    """Fill unset --num-frames/--height/--width/--guidance from the model's defaults and check them,
    before anything heavy loads."""
    check_positive(args, "num_frames", "height", "width")  # (0 passes every divisibility rule below)
    defaults = model_defaults(path, family)
    for k in ("num_frames", "height", "width", "guidance", "guidance_2", "fps"):
        if getattr(args, k) is None:
            setattr(args, k, defaults.get(k))
    toy_patch = (1, 4, 4)
    if family == "toy":  # (pixel space: the denoiser's patches set the rule; read from its config, no weights)
        with open(os.path.join(path, DENOISER_FOLDER["toy"], "config.json")) as f:
            toy_patch = tuple(json.load(f)["patch_size"])
    check_video_size(family, args.num_frames, args.height, args.width, toy_patch)
    if family == "wan" and args.height and args.width and (args.height % 32 or args.width % 32):
        with open(os.path.join(path, "model_index.json")) as f:
            ti2v = json.load(f).get("expand_timesteps")
        if ti2v:  # Wan 2.2 TI2V 5B: a 16x VAE and 2x2 patches
            raise ValueError(f"--height {args.height} --width {args.width}: Wan 2.2 TI2V 5B needs multiples of 32 "
                             f"(its 16x VAE, then 2x2 patches), e.g. 704x1280 for 720p")
    per_block = getattr(args, "grad_checkpointing", False) and not hasattr(args, "backprop_steps")  # (VADER's flag
    if family == "modelscope" and per_block:  # checkpoints whole sampler calls, which works for every family)
        raise ValueError("--grad-checkpointing: diffusers' UNet3DConditionModel (ModelScope) does not support "
                         "gradient checkpointing; drop the flag for this model")


@dataclasses.dataclass
class VideoModel:
    """Everything a loop needs about one text-to-video model."""
    path: str
    family: str
    prediction: str  # "flow", "v" or "eps": what the denoiser predicts
    tokenizer: object
    text_encoder: torch.nn.Module
    denoiser: torch.nn.Module
    vae: object  # None in pixel space (the toy model)
    scheduler: object
    max_sequence_length: int
    expand_timesteps: bool = False  # Wan 2.2 TI2V gives the timestep per token
    denoiser_2: torch.nn.Module = None  # Wan 2.2 A14B's low-noise expert (`transformer_2`), else None
    boundary: float = None  # timesteps >= boundary go to `denoiser` (high noise), the others to `denoiser_2`
    tokenizer_2: object = None  # HunyuanVideo 1.5: the ByT5 glyph tokenizer and encoder beside Qwen2.5-VL
    text_encoder_2: torch.nn.Module = None
    prompt_cache: collections.OrderedDict = dataclasses.field(default_factory=collections.OrderedDict)

    @property
    def device(self):
        return next(self.denoiser.parameters()).device

    @property
    def experts(self):
        """The denoiser(s): one, or Wan 2.2 A14B's two (high-noise, low-noise)."""
        return [self.denoiser] if self.denoiser_2 is None else [self.denoiser, self.denoiser_2]


def load_model(name_or_path, device="cpu", dtype=torch.float32, denoiser_dtype=torch.float32):
    """Load tokenizer, text encoder, denoiser, VAE and scheduler through the ordinary from_pretrained.
    Frozen parts are cast to `dtype`, the trainable denoiser to `denoiser_dtype`."""
    import diffusers
    import transformers

    path, family = resolve_model(name_or_path)
    with open(os.path.join(path, "model_index.json")) as f:
        index = json.load(f)

    def component(name, dtype=None):
        library, cls = index[name]
        if dtype is None:  # tokenizer, scheduler
            return getattr(transformers if library == "transformers" else diffusers, cls).from_pretrained(
                os.path.join(path, name))
        # the dtype goes to from_pretrained, not .to(): both libraries then keep the modules a model marks
        # `_keep_in_fp32_modules` (Wan's norms and time embedding, T5's `wo`) in fp32, as their pipelines do
        if library == "transformers":
            model = getattr(transformers, cls).from_pretrained(os.path.join(path, name), dtype=dtype)
        else:
            model = getattr(diffusers, cls).from_pretrained(os.path.join(path, name), torch_dtype=dtype)
        return model.to(device)

    tokenizer = component("tokenizer")
    text_encoder = component("text_encoder", dtype).eval().requires_grad_(False)
    denoiser = component(DENOISER_FOLDER[family], denoiser_dtype)
    denoiser_2, boundary = None, None
    if index.get("transformer_2", [None])[0] is not None:  # Wan 2.2 A14B: the low-noise expert
        denoiser_2 = component("transformer_2", denoiser_dtype)
    scheduler = component("scheduler")
    if denoiser_2 is not None and index.get("boundary_ratio") is not None:  # as WanPipeline switches experts
        boundary = index["boundary_ratio"] * scheduler.config.num_train_timesteps
    vae = None
    if index.get("vae", [None])[0] is not None:
        vae = component("vae", dtype).eval().requires_grad_(False)
    cls = type(scheduler).__name__
    prediction = "flow" if ("FlowMatch" in cls or scheduler.config.get("use_flow_sigmas")) else \
        ("v" if scheduler.config.get("prediction_type") == "v_prediction" else "eps")
    if family == "hunyuan15":  # + the ByT5 glyph encoder; Qwen2.5-VL's 1000 tokens after the template (the pipeline's)
        return VideoModel(path, family, prediction, tokenizer, text_encoder, denoiser, vae, scheduler, 1000,
                          tokenizer_2=component("tokenizer_2"),
                          text_encoder_2=component("text_encoder_2", dtype).eval().requires_grad_(False))
    max_len = {"toy": index.get("max_sequence_length", 16), "wan": 512, "cogvideox": 226, "ltx": 128,
               "modelscope": tokenizer.model_max_length}[family]
    return VideoModel(path, family, prediction, tokenizer, text_encoder, denoiser, vae, scheduler, max_len,
                      expand_timesteps=bool(index.get("expand_timesteps", False)), denoiser_2=denoiser_2, boundary=boundary)


# ----------------------------------------------------------------------------------------------
# Prompts
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


PROMPT_CACHE_SIZE = 128  # prompts whose embeddings stay on the device (one Wan UMT5 embedding: 512 x 4096)


@torch.no_grad()
def _encode_prompts_hunyuan15(model, prompts):
    """HunyuanVideo 1.5's two text streams, packed into encode_prompts' (embeddings, mask) pair so the sampler
    and the loops pass them on untouched: rows [0, L) are Qwen2.5-VL's hidden states (layer -3, after the chat
    template's first 108 tokens are cropped), rows [L, L + 256) ByT5's embedding of the quoted glyph text (zeros
    and mask 0 when the prompt quotes none); features are zero-padded to the wider of the two. `denoise` unpacks.
    The encoding calls the stock pipeline's own static helpers with their defaults, which are the pipeline's
    settings (system prompt, crop 108, 1000 + 256 tokens): re-implementing the chat template, the crop and the
    glyph-text regex would only be a second copy to keep in sync (tests/test_hunyuan15.py checks the result
    against HunyuanVideo15Pipeline.encode_prompt)."""
    from diffusers import HunyuanVideo15Pipeline as P
    cache = model.prompt_cache
    missing = [p for p in dict.fromkeys(prompts) if p not in cache]
    if missing:
        dev = model.text_encoder.device
        e1, m1 = P._get_mllm_prompt_embeds(model.text_encoder, model.tokenizer, missing, dev,
                                            tokenizer_max_length=model.max_sequence_length)
        e2, m2 = P._get_byt5_prompt_embeds(model.tokenizer_2, model.text_encoder_2, missing, dev)
        emb = e1.new_zeros(len(missing), e1.shape[1] + e2.shape[1], max(e1.shape[2], e2.shape[2]),
                           dtype=torch.promote_types(e1.dtype, e2.dtype))
        emb[:, : e1.shape[1], : e1.shape[2]] = e1
        emb[:, e1.shape[1]:, : e2.shape[2]] = e2
        mask = torch.cat([m1.to(dev), m2.to(dev)], 1).bool()
        for p, e, m in zip(missing, emb, mask):
            cache[p] = (e.clone(), m)
    for p in prompts:
        cache.move_to_end(p)
    emb = torch.stack([cache[p][0] for p in prompts])
    mask = torch.stack([cache[p][1] for p in prompts])
    while len(cache) > PROMPT_CACHE_SIZE:
        cache.popitem(last=False)
    return emb, mask


@torch.no_grad()
def encode_prompts(model, prompts):
    """(embeddings [B, L, D], attention mask [B, L] or None) exactly as the family's pipeline builds them.
    Repeated prompts (the empty negative prompt, candidates of one prompt) are encoded once; the cache keeps
    the PROMPT_CACHE_SIZE most recently used."""
    if model.family == "hunyuan15":
        return _encode_prompts_hunyuan15(model, prompts)
    cache = model.prompt_cache
    missing = [p for p in dict.fromkeys(prompts) if p not in cache]
    if missing:
        dev = model.text_encoder.device
        t = model.tokenizer(missing, padding="max_length", max_length=model.max_sequence_length, truncation=True,
                            add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids, mask = t.input_ids.to(dev), t.attention_mask.to(dev)
        if model.family in ("toy", "wan"):  # Wan: encode with the mask, zero everything past the text
            emb = model.text_encoder(ids, mask).last_hidden_state * mask[..., None]
        elif model.family == "modelscope" and getattr(model.text_encoder.config, "use_attention_mask", False):
            emb = model.text_encoder(ids, attention_mask=mask)[0]
        else:  # CogVideoX, LTX and CLIP encode the padded ids without a mask
            emb = model.text_encoder(ids)[0]
        for p, e, m in zip(missing, emb, mask):
            cache[p] = (e.clone(), m.bool())  # a clone: a view would keep its whole batch alive
    for p in prompts:
        cache.move_to_end(p)
    emb = torch.stack([cache[p][0] for p in prompts])
    mask = torch.stack([cache[p][1] for p in prompts])
    while len(cache) > PROMPT_CACHE_SIZE:
        cache.popitem(last=False)  # least recently used first
    return emb, (mask if model.family == "ltx" else None)


# ----------------------------------------------------------------------------------------------
# Latent geometry, the denoiser call, decoding
# ----------------------------------------------------------------------------------------------
def latent_shape(model, num_frames, height, width):
    """Per-video latent shape in the family's layout."""
    if model.vae is None:
        return (model.denoiser.config.in_channels, num_frames, height, width)
    if model.family == "wan":
        st, ss = model.vae.config.scale_factor_temporal, model.vae.config.scale_factor_spatial
        return (model.denoiser.config.in_channels, (num_frames - 1) // st + 1, height // ss, width // ss)
    if model.family == "cogvideox":
        ss = 2 ** (len(model.vae.config.block_out_channels) - 1)
        frames = (num_frames - 1) // model.vae.config.temporal_compression_ratio + 1
        pt = model.denoiser.config.patch_size_t
        if pt is not None and frames % pt:
            raise ValueError(f"CogVideoX 1.5 needs latent frames divisible by {pt}: choose --num-frames so that "
                             f"(num_frames - 1) / 4 + 1 is a multiple of {pt}")
        return (frames, model.denoiser.config.in_channels, height // ss, width // ss)
    if model.family == "ltx":
        st, ss = model.vae.temporal_compression_ratio, model.vae.spatial_compression_ratio
        return (model.denoiser.config.in_channels, (num_frames - 1) // st + 1, height // ss, width // ss)
    if model.family == "hunyuan15":  # the VAE's latent channels (the DiT's input adds condition + mask channels)
        st, ss = model.vae.temporal_compression_ratio, model.vae.spatial_compression_ratio
        return (model.vae.config.latent_channels, (num_frames - 1) // st + 1, height // ss, width // ss)
    ss = 2 ** (len(model.vae.config.block_out_channels) - 1)  # modelscope: 2D VAE, one latent per frame
    return (model.denoiser.config.in_channels, num_frames, height // ss, width // ss)


def _cogvideox_rotary(model, latents):
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
    cfg = model.denoiser.config
    if not cfg.use_rotary_positional_embeddings:
        return None
    gh, gw = latents.shape[3] // cfg.patch_size, latents.shape[4] // cfg.patch_size
    bw, bh = cfg.sample_width // cfg.patch_size, cfg.sample_height // cfg.patch_size
    if cfg.patch_size_t is None:
        crops = get_resize_crop_region_for_grid((gh, gw), bw, bh)
        return get_3d_rotary_pos_embed(cfg.attention_head_dim, crops, (gh, gw), latents.shape[1], device=latents.device)
    frames = (latents.shape[1] + cfg.patch_size_t - 1) // cfg.patch_size_t
    return get_3d_rotary_pos_embed(cfg.attention_head_dim, None, (gh, gw), frames, grid_type="slice",
                                   max_size=(bh, bw), device=latents.device)


def denoise(model, latents, timestep, embeds, mask=None):
    """f_theta(x_t, t, c) in the latent layout; `timestep` is [B] in the scheduler's units. With Wan 2.2
    A14B's two experts each sample goes to the expert that owns its timestep (t >= boundary: high-noise
    `transformer`, else low-noise `transformer_2`, as WanPipeline switches), so a DPO/RWR batch of mixed
    timesteps trains both and VADER's last (low-noise) steps reach `transformer_2` only."""
    if model.denoiser_2 is None:
        return _denoise(model, model.denoiser, latents, timestep, embeds, mask)
    high = timestep >= model.boundary
    if high.all() or not high.any():
        return _denoise(model, model.denoiser if high.all() else model.denoiser_2, latents, timestep, embeds, mask)
    out = None
    for den, idx in ((model.denoiser, high), (model.denoiser_2, ~high)):
        part = _denoise(model, den, latents[idx], timestep[idx], embeds[idx], None if mask is None else mask[idx])
        out = part.new_zeros((latents.shape[0], *part.shape[1:])) if out is None else out
        out = out.index_put((idx,), part)
    return out


def _denoise(model, den, latents, timestep, embeds, mask=None):
    fam = model.family
    x = latents.to(den.dtype)
    if fam in ("toy", "wan"):
        if model.expand_timesteps:  # Wan 2.2 TI2V: one timestep per (latent-frame, 2x2) token
            p = den.config.patch_size
            n = (x.shape[2] // p[0]) * (x.shape[3] // p[1]) * (x.shape[4] // p[2])
            timestep = timestep[:, None].expand(-1, n)
        return den(x, timestep=timestep, encoder_hidden_states=embeds, return_dict=False)[0]
    if fam == "cogvideox":
        return den(hidden_states=x, encoder_hidden_states=embeds, timestep=timestep,
                   image_rotary_emb=_cogvideox_rotary(model, x), return_dict=False)[0]
    if fam == "ltx":  # pack [B, C, F, H, W] -> tokens [B, F*H*W, C] (LTX patch sizes are 1), then back
        B, C, F, H, W = x.shape
        tokens = x.permute(0, 2, 3, 4, 1).reshape(B, F * H * W, C)
        st, ss = model.vae.temporal_compression_ratio, model.vae.spatial_compression_ratio
        out = den(hidden_states=tokens, encoder_hidden_states=embeds, timestep=timestep, encoder_attention_mask=mask,
                  num_frames=F, height=H, width=W, rope_interpolation_scale=(st / 25, ss, ss), return_dict=False)[0]
        return out.reshape(B, F, H, W, -1).permute(0, 4, 1, 2, 3)
    if fam == "hunyuan15":  # T2V, as HunyuanVideo15Pipeline calls it: the input is [x, zero condition latents,
        # zero mask channel] on channels, the image tokens all zero (which the DiT reads as "no image"), the
        # timestep in the DiT's dtype; the two text streams come packed by encode_prompts
        B, C, F, H, W = x.shape
        cfg, L = den.config, model.max_sequence_length
        embeds, mask = embeds.to(den.dtype), mask.to(den.dtype)
        return den(torch.cat([x, x.new_zeros(B, C + 1, F, H, W)], 1), timestep=timestep.to(den.dtype),
                   encoder_hidden_states=embeds[:, :L, : cfg.text_embed_dim], encoder_attention_mask=mask[:, :L],
                   encoder_hidden_states_2=embeds[:, L:, : cfg.text_embed_2_dim], encoder_attention_mask_2=mask[:, L:],
                   image_embeds=x.new_zeros(B, HUNYUAN15_IMAGE_TOKENS, cfg.image_embed_dim), return_dict=False)[0]
    return den(x, timestep, encoder_hidden_states=embeds, return_dict=False)[0]  # modelscope UNet3D


def _causal_prefix(frame, stride):
    """Latent frames a causal video VAE needs to decode pixel frame `frame` (latent 0 -> pixel 0,
    latent k -> pixels stride*(k-1)+1 .. stride*k)."""
    return -(-frame // stride) + 1


def decode(model, latents, frames=None, prefix_grad=True):
    """Latents -> videos [B, F, C, H, W] in [0, 1]. `frames` (pixel-frame indices) decodes only what a
    reward needs: exactly those frames for pixel/2D-VAE models, the causal prefix up to the last one
    for Wan/CogVideoX (their 3D VAEs are causal: frame k depends only on latents <= k).
    prefix_grad=False (Wan, VADER's --decoder-grad own): under autograd, only the latent frames that hold a
    requested frame keep activations; the rest of the causal prefix decodes to the same values without."""
    if model.vae is None:  # pixel space: latents are [B, C, F, H, W] in [-1, 1]
        video = latents.permute(0, 2, 1, 3, 4)
        video = video if frames is None else video[:, frames]
        return (video.float() / 2 + 0.5).clamp(0, 1)
    vae = model.vae
    x = latents.to(vae.dtype)
    if model.family == "wan":
        if frames is not None:
            x = x[:, :, : _causal_prefix(max(frames), vae.config.scale_factor_temporal)]
        mean = torch.tensor(vae.config.latents_mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1, 1)
        if frames is not None and not prefix_grad and torch.is_grad_enabled():
            own = {_causal_prefix(f, vae.config.scale_factor_temporal) - 1 for f in frames}
            video = _wan_decode_own_grad(vae, x * std + mean, own).permute(0, 2, 1, 3, 4)
        else:
            video = vae.decode(x * std + mean, return_dict=False)[0].permute(0, 2, 1, 3, 4)
    elif model.family == "cogvideox":
        if frames is not None:  # the VAE decodes latent frames in batches (first b + n % b, then b at a time)
            # and normalises within each: cut at the first batch boundary of the full decode past the causal
            # prefix (at worst all n), so the prefix decodes exactly as in the full decode
            n, b = x.shape[1], vae.num_latent_frames_batch_size
            need = _causal_prefix(max(frames), vae.config.temporal_compression_ratio)
            x = x[:, : min(n % b + b * max(1, -(-(need - n % b) // b)), n)]
        video = vae.decode(x.permute(0, 2, 1, 3, 4) / vae.config.scaling_factor).sample.permute(0, 2, 1, 3, 4)
    elif model.family == "ltx":
        mean = vae.latents_mean.view(1, -1, 1, 1, 1).to(x)
        std = vae.latents_std.view(1, -1, 1, 1, 1).to(x)
        x = x * std / vae.config.scaling_factor + mean
        t = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype) if vae.config.timestep_conditioning else None
        video = vae.decode(x, t, return_dict=False)[0].permute(0, 2, 1, 3, 4)
    elif model.family == "hunyuan15":  # causal 3D VAE (4x in time): a frame subset needs only its causal prefix.
        # One video per decoder call: diffusers 0.42's VAE mid-block attention builds a [B, N, N] mask that
        # breaks on B > 1 (diffusers PR #13133); the stock pipeline decodes a batch only with vae.enable_slicing()
        if frames is not None:
            x = x[:, :, : _causal_prefix(max(frames), vae.temporal_compression_ratio)]
        x = x / vae.config.scaling_factor
        video = torch.cat([vae.decode(z, return_dict=False)[0] for z in x.split(1)]).permute(0, 2, 1, 3, 4)
    else:  # modelscope: a 2D VAE frame by frame, so a frame subset costs only those frames
        if frames is not None:
            x = x[:, :, frames]
        B, C, F, H, W = x.shape
        img = vae.decode(x.permute(0, 2, 1, 3, 4).reshape(B * F, C, H, W) / vae.config.scaling_factor).sample
        video = img.reshape(B, F, *img.shape[1:])
    if frames is not None and model.family != "modelscope":
        video = video[:, frames]
    return (video.float() / 2 + 0.5).clamp(0, 1)


def _wan_decode_own_grad(vae, z, grad_latents):
    """AutoencoderKLWan._decode (diffusers 0.42): latent frame by latent frame through the decoder's causal
    feature cache, with autograd on only for the latent frames in `grad_latents`. The other frames decode to
    the same values and keep no activations: the reward's gradient reaches the latent frames of the decoded
    frames but not, through the cache, the earlier ones (a truncation, like VADER's K for sampler steps)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    out = []
    for i in range(z.shape[2]):
        vae._conv_idx = [0]
        chunk = x[:, :, i: i + 1] if i in grad_latents else x[:, :, i: i + 1].detach()
        with torch.set_grad_enabled(i in grad_latents):
            out.append(vae.decoder(chunk, feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                   **({"first_chunk": True} if i == 0 else {})))
    vae.clear_cache()
    out = torch.cat(out, 2)
    if vae.config.patch_size is not None:
        out = unpatchify(out, patch_size=vae.config.patch_size)
    return out.clamp(-1.0, 1.0)


# ----------------------------------------------------------------------------------------------
# The batched sampler
# ----------------------------------------------------------------------------------------------
def seed_for(*keys):
    """A 63-bit seed from any tuple of ints/strings: candidate j of prompt i at step s gets
    seed_for(run_seed, s, i, j) on whichever rank draws it, so sharding never changes the samples."""
    return int.from_bytes(hashlib.sha256(repr(keys).encode()).digest()[:8], "little") >> 1


def set_timesteps(model, steps, shape):
    sch = model.scheduler
    if model.family == "ltx":  # LTX shifts the sigmas by the token count, as LTXPipeline does
        from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift
        c = sch.config
        mu = calculate_shift(shape[1] * shape[2] * shape[3], c.get("base_image_seq_len", 256),
                             c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        sch.set_timesteps(sigmas=[1.0 - i * (1 - 1 / steps) / max(steps - 1, 1) for i in range(steps)],
                          device=model.device, mu=mu)
    elif model.family == "hunyuan15":  # HunyuanVideo15Pipeline: sigmas linspace(1, 0, steps + 1)[:-1], then the shift
        import numpy as np
        sch.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1], device=model.device)
    else:
        sch.set_timesteps(steps, device=model.device)
    if hasattr(sch, "set_begin_index"):
        sch.set_begin_index(0)
    return sch.timesteps


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
    shape = latent_shape(model, num_frames, height, width)
    # per-sample seeds (a candidate is reproducible alone); stochastic schedulers then draw their step noise
    # from the SAME generators, as the stock pipelines do
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    latents = torch.cat([torch.randn((1, *shape), generator=g) for g in gens]).to(dev)
    timesteps = set_timesteps(model, steps, shape)
    latents = latents * getattr(model.scheduler, "init_noise_sigma", 1.0)
    emb, mask = encode_prompts(model, list(prompts))
    nemb, nmask = encode_prompts(model, [negative_prompt] * B)
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
    per_block_only = any(sharding.is_fsdp(den) for den in model.experts)
    old_x0 = None  # CogVideoX's DPM scheduler carries the previous x0 prediction
    sch = model.scheduler
    for i, t in enumerate(tqdm(timesteps, desc="sampling", leave=False, disable=not progress)):
        with torch.set_grad_enabled(i >= grad_from and torch.is_grad_enabled()), \
                (autocast or contextlib.nullcontext()):
            x_in = torch.cat([latents, latents]) if cfg else latents
            if hasattr(sch, "scale_model_input") and model.family in ("cogvideox", "modelscope"):
                x_in = sch.scale_model_input(x_in, t)
            tt = t.expand(x_in.shape[0])
            if grad_checkpointing and i >= grad_from and not per_block_only:
                pred = torch.utils.checkpoint.checkpoint(denoise, model, x_in, tt, emb_in, mask_in, use_reentrant=False)
            else:
                pred = denoise(model, x_in, tt, emb_in, mask_in)
            pred = pred.float()
            if cfg:
                uncond, cond = pred.chunk(2)
                g = guidance if model.denoiser_2 is None or t >= model.boundary else guidance_2
                pred = uncond + g * (cond - uncond)
            if model.family == "cogvideox" and type(sch).__name__ == "CogVideoXDPMScheduler":
                latents, old_x0 = sch.step(pred, old_x0, t, timesteps[i - 1] if i > 0 else None, latents,
                                           generator=gens, return_dict=False)
            elif model.family == "modelscope":  # the stock pipeline steps frames as images
                Bc, C, F, H, W = latents.shape
                step = sch.step(pred.permute(0, 2, 1, 3, 4).reshape(Bc * F, C, H, W), t,
                                latents.permute(0, 2, 1, 3, 4).reshape(Bc * F, C, H, W)).prev_sample
                latents = step.reshape(Bc, F, C, H, W).permute(0, 2, 1, 3, 4)
            else:
                kw = {"generator": gens} if "generator" in sch.step.__code__.co_varnames else {}
                x_prev, latents = latents, sch.step(pred, t, latents, return_dict=False, **kw)[0]
                if i == branch_at:  # x_t = (1 - s) x0 + s eps: swap the eps_hat the step carried for the branch's own
                    s, s_next = sch.sigmas[i].item(), sch.sigmas[i + 1].item()
                    x_b = getattr(sch, "last_sample", None)  # UniPC: its corrected x_b; Euler: the step's input
                    eps_hat = x_prev.float() + (1 - s) * pred if x_b is None else \
                        (x_b.float() - (1 - s) * sch.model_outputs[-1].float()) / s  # (its x0 estimate)
                    eps = torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(int(b)))
                                     for b in branch_seeds]).to(eps_hat)
                    latents = latents + (s_next * (eps - eps_hat)).to(latents)
                    if x_b is not None:  # UniPC's corrector rebuilds x_{b+1} from x_b: branch x_b there too
                        sch.last_sample = x_b + (s * (eps - eps_hat)).to(x_b)
    with torch.set_grad_enabled(grad_from < len(timesteps) and torch.is_grad_enabled()):
        videos = decode(model, latents, decode_frames, decoder_prefix_grad)
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
# Training-side helpers: timesteps, noising, targets
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
        emb, mask = encode_prompts(model, list(prompts[c: c + batch_size]) * 2)
        inside = torch.zeros(n, device=dev)
        for k in range(draws):
            gens = [torch.Generator().manual_seed(seed_for(seed, "implicit-accuracy", *ids[c + i], k)) for i in range(n)]
            t = torch.cat([sample_train_timesteps(model, 1, g, distribution) for g in gens])
            eps = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens])
            t, eps = torch.cat([t, t]).to(dev), torch.cat([eps, eps]).to(dev)  # shared by w and l
            x_t, target = noisy_and_target(model, x0, eps, t)
            with (autocast or contextlib.nullcontext()):
                init_pred = init.forward(denoise, model, x_t, t, emb, mask)
                pred = denoise(model, x_t, t, emb, mask)
            e_w, e_l = per_sample_mse(pred, target).chunk(2)
            i_w, i_l = per_sample_mse(init_pred, target).chunk(2)
            inside -= (e_w - i_w) - (e_l - i_l)
        out += ((inside > 0).float() + 0.5 * (inside == 0).float()).tolist()
    return out


def per_sample_mse(pred, target):
    """mean over all non-batch dims: the `mse` of docs/ALGORITHMS.md."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


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
        sharding.reshard(self.modules)
        try:
            return fn(*args)
        finally:
            for p, s in zip(self.params, saved):
                p.copy_(s)
            torch.clear_autocast_cache()
            sharding.reshard(self.modules)


def modules_of(obj):
    """The torch modules an object keeps in its attributes (a reward's networks, a weighted sum's terms')."""
    if isinstance(obj, torch.nn.Module):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [m for x in obj for m in modules_of(x)]
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return [m for v in vars(obj).values() if isinstance(v, (torch.nn.Module, list, tuple)) for m in modules_of(v)]
    return []


class Offload:
    """--offload-frozen: frozen models that the DPO update never calls (text encoder, VAE, reward model) leave
    the GPU while it runs. `away()` frees their weights' device memory (each storage resized to 0, the way
    FSDP2 frees gathered weights); `back()` reallocates them and copies them in from a host copy taken once:
    they are frozen, so it never goes stale, and each step costs one host-to-device copy. A call into an
    offloaded model fails loudly (its weights have no storage) instead of computing on garbage.
    Wan 14B at 480x832x81 under --fsdp on 8 x 80 GB: 76.9 -> 50.7 GiB per rank (benchmarks/memory_plan.py);
    the price is host memory: each rank keeps its own pinned copy (26 GiB with UMT5-XXL + VideoScore)."""

    def __init__(self, modules, enabled=True):
        by_storage = {}  # one entry per storage (tied weights share one), found before any is freed
        for t in (t for m in modules for t in list(m.parameters()) + list(m.buffers())) if enabled else ():
            if t.untyped_storage().nbytes():
                by_storage.setdefault(t.untyped_storage()._cdata, []).append(t)  # (the storage itself)
        self.storages = []
        for ts in by_storage.values():
            s = ts[0].untyped_storage()
            if not s.resizable():  # weights read straight from a memory-mapped file (CPU): into memory of our own
                s = torch.empty(s.nbytes(), dtype=torch.uint8, device=s.device).untyped_storage().copy_(s)
                with torch.no_grad():
                    for t in ts:
                        t.set_(s, t.storage_offset(), t.shape, t.stride())
            self.storages.append(s)
        self.host, self.is_away = None, False

    def away(self):
        if self.is_away:
            return
        if self.host is None:  # pinned when on a GPU: the copies back are then asynchronous
            pin = any(s.device.type == "cuda" for s in self.storages)
            self.host = [torch.empty(s.nbytes(), dtype=torch.uint8, pin_memory=pin).untyped_storage().copy_(s)
                         for s in self.storages]
        for s in self.storages:
            s.resize_(0)
        self.is_away = True

    def back(self):
        if not self.is_away:
            return
        for s, h in zip(self.storages, self.host):
            s.resize_(h.nbytes())
            s.copy_(h, non_blocking=True)
        self.is_away = False


def save_lora(model, folder, main=True):
    """Write the LoRA in the diffusers format that the stock pipeline's `load_lora_weights` reads. Wan 2.2
    A14B's low-noise expert gets its own file in `<folder>_transformer_2`, loaded with
    `load_lora_weights(..., load_into_transformer_2=True)`."""
    if model.denoiser_2 is not None:
        _save_lora(model, model.denoiser_2, folder + "_transformer_2", main)
    _save_lora(model, model.denoiser, folder, main)


def _save_lora(model, den, folder, main):
    import diffusers
    from peft.utils import get_peft_model_state_dict
    # under FSDP every rank gathers the full adapter (a collective) and only rank 0 writes it
    state = {k: sharding.full(v).detach().cpu().contiguous() for k, v in get_peft_model_state_dict(den).items()}
    if not main:
        return
    # the LoraConfig goes along as metadata: without it load_lora_weights assumes lora_alpha = rank
    config = den.peft_config["default"].to_dict()
    if model.family == "modelscope":
        diffusers.TextToVideoSDPipeline.save_lora_weights(folder, unet_lora_layers=state,
                                                          unet_lora_adapter_metadata=config)
    elif model.family == "hunyuan15":  # HunyuanVideo15Pipeline has no LoRA loader mixin (no load_lora_weights) in
        # diffusers 0.42: the file is the standard one (keys "transformer.*" + the LoraConfig metadata) that its
        # transformer reads with `pipe.transformer.load_lora_adapter(folder, prefix="transformer")`
        from diffusers.loaders import HunyuanVideoLoraLoaderMixin
        HunyuanVideoLoraLoaderMixin.save_lora_weights(folder, transformer_lora_layers=state,
                                                      transformer_lora_adapter_metadata=config)
    else:
        getattr(diffusers, PIPELINE_CLASS[model.family]).save_lora_weights(folder, transformer_lora_layers=state,
                                                                           transformer_lora_adapter_metadata=config)


# ----------------------------------------------------------------------------------------------
# Distributed (torchrun): set-up and gradient averaging
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: str = "cpu"

    @property
    def main(self):
        return self.rank == 0


def process_group_backend(cuda):
    """One process group for CPU AND CUDA tensors: gloo serves CPU tensors (logging, pair counts), nccl the
    CUDA ones (gradients). A plain "nccl" group serves CUDA tensors only and a GPU run would crash at its
    first CPU reduction; CPU runs (and the tests) get the same gloo half a GPU run gets."""
    return "cpu:gloo,cuda:nccl" if cuda else "cpu:gloo"


def setup_distributed(device_arg=None):
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and join the process group."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available() and (device_arg is None or device_arg.startswith("cuda"))
    device = device_arg or ("cuda" if cuda else "cpu")
    if cuda:
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(process_group_backend(cuda))
    return Dist(rank, world, device)


def average_gradients(params, d):
    """All-reduce the gradients of `params` in place and divide by the world size. Called explicitly in
    every loop after backward: the popular video-alignment repos that skip this train each rank on its
    own shard and silently drift apart (the torchrun tests catch it). Tensor by tensor, so a full
    fine-tune never holds a second, flat copy of its gradients. Under FSDP2 (sharded parameters) the
    gradients were already reduce-scattered as a mean: nothing to do."""
    if d.world == 1 or sharding.is_sharded(params):
        return
    for p in params:
        if p.grad is None:  # (a rank with no DPO pair this step still joins the average, with zeros)
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad /= d.world


def clip_grad_norm(params, max_norm):
    """torch's clip_grad_norm_, as a float (under FSDP the norm is a DTensor: its full value)."""
    return float(sharding.full(torch.nn.utils.clip_grad_norm_(params, max_norm)))


def broadcast_params(params, d):
    """Start every rank from rank 0's trainable weights (LoRA's random init included)."""
    if d.world > 1:
        for p in params:
            dist.broadcast(p.data, src=0)


def all_mean(values, d):
    """Average a dict of floats across ranks (for logging)."""
    if d.world == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: (t[i] / d.world).item() for i, k in enumerate(keys)}


def all_gather_tensor(x, d):
    """Concatenate a [n, ...] tensor from every rank (rank order) along dim 0."""
    if d.world == 1:
        return x
    out = [torch.empty_like(x) for _ in range(d.world)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


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
    totals = all_mean({k: v[:n].sum().item() * d.world for k, v in scores.items()} | {"n": n * d.world}, d)
    return {k: v / totals["n"] for k, v in totals.items() if k != "n"}


# ----------------------------------------------------------------------------------------------
# Command line: --help, the flags a command typed, --resume's configuration, checks before loading
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
RESUME_OWN = {"resume", "out", "device", "fsdp", "track"}
# --resume: flags that may differ from the run's, as they do not change what it trains or how it is evaluated:
# --steps/--rounds extend it, the intervals say how often it evaluates and saves, the rest trade memory or time
RESUME_SAFE = {"steps", "rounds", "eval_every", "save_every", "sample_batch_size", "offload_frozen",
               "grad_checkpointing", "judge_timeout", "judge_retries"}
SCRIPT_FLAGS = {"vlm_feedback_rwr": "judge", "gran_dpo": "patch_grid", "vader_grad": "backprop_mode",
                "online_vpo": "num_candidates"}  # a flag only that script has (checked in this order)


def script_of(cfg):
    """The script that wrote a run's config.json: its "script" (written since issue #31), else the script in
    the command it records, else told by a flag only that script has."""
    if cfg.get("script"):
        return cfg["script"]
    m = re.search(r"(\w+)\.py", cfg.get("command") or "")
    return m.group(1) if m else next((s for s, k in SCRIPT_FLAGS.items() if k in cfg), None)


def resume_config(args, parser, script):
    """--resume continues the run that was started. Every flag the command did not give takes the run's saved
    value (config.json); a given flag may differ from it only where that leaves the run the same (RESUME_SAFE;
    RESUME_OWN are this command's own: --out forks the run); any other given flag that differs is refused by
    name, as is another script's run, a damaged checkpoint, or a sharded one without --fsdp (and the reverse).
    Call it first in main(): it reads only small files. `args.given` lists the flags the command typed
    (common.parse_args); where it is missing (main() called from Python with a whole namespace) a flag counts
    as given where it differs from the parser's default. Returns the checkpoint to load, or None: a new run, or
    one that failed before its first checkpoint, which then starts afresh from its saved configuration."""
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
            if k in given and k not in RESUME_SAFE and getattr(args, k) != defaults[k]:
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
    folder = os.path.join(model_path, "scheduler")
    configs = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".json")] if os.path.isdir(folder) else []
    cfg = json.load(open(configs[0])) if configs else {}
    if cfg and "FlowMatch" not in cfg.get("_class_name", "") and not cfg.get("use_flow_sigmas"):
        raise ValueError(f"--branch-at: {cfg.get('_class_name')} is not a flow-matching sampler (CogVideoX, ModelScope): "
                         f"drop --branch-at for this model")


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
DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # --mixed-precision -> frozen dtype


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
        sharding.barrier()  # (every rank has checked before rank 0 writes, and reads only once it has)
        if main:
            fork_run(resume, out)
        sharding.barrier()
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
    main, sharded = d is None or d.main, sharding.is_sharded(params)
    if not (main or sharded):
        return None
    final = os.path.join(folder, f"step-{step:06d}")
    tmp = final + ".tmp"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    state = {"step": step, "rng": rng_state(), "extra": extra or {}, "scaler": scaler.state_dict() if scaler else {}}
    if sharded:
        sharding.barrier()
        tensors = {k: v for k, v in state["extra"].items() if isinstance(v, list) and v and torch.is_tensor(v[0])}
        sharding.save(tmp, model, params, optimizer, tensors)
        state["extra"] = {k: v for k, v in state["extra"].items() if k not in tensors} | {"sharded": sorted(tensors)}
    else:
        state |= {"params": [p.detach().cpu() for p in params], "optimizer": optimizer.state_dict()}
    if lora:
        save_lora(model, os.path.join(tmp, "lora"), main)
    if main:
        torch.save(state, os.path.join(tmp, "state.pt"))
    if sharded:  # every rank's shards are written before the folder is renamed, and renamed before anyone goes on
        sharding.barrier()
    if main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    if sharded:
        sharding.barrier()
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
    if sharding.is_sharded(params) != ("sharded" in state["extra"]):
        raise ValueError(f"--resume {path}: the checkpoint was {'' if 'sharded' in state['extra'] else 'not '}written "
                         f"with --fsdp; resume it the same way")
    if "sharded" in state["extra"]:
        sharding.load(folder, model, params, optimizer, {k: like[k] for k in state["extra"]["sharded"]})
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


PIPELINE_CLASS = {"toy": "WanPipeline", "wan": "WanPipeline", "cogvideox": "CogVideoXPipeline", "ltx": "LTXPipeline",
                  "modelscope": "TextToVideoSDPipeline",
                  "hunyuan15": "HunyuanVideo15Pipeline"}


def hub_id(cfg):
    """The Hugging Face Hub id a run's base model came from (an alias of one, a hub id, or a download of one in
    the hub cache), or None for a local folder."""
    name = MODEL_ALIASES.get(cfg["model"], cfg["model"])
    if not os.path.isdir(name) and name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return name
    m = re.search(r"models--([^/]+)--([^/]+)/snapshots/", cfg.get("model_path") or "")
    return f"{m.group(1)}/{m.group(2)}" if m else None


def write_model_card(out, script, algorithm, paper, samples_seen):
    """<final checkpoint>/lora/README.md: a Hugging Face model card (YAML metadata: base model when it is a
    hub id, library, tags) written from the run's own config.json and metrics.jsonl: algorithm, base model,
    reward, command, steps and samples seen, seed, the held-out evaluation before and after on every figure
    (and on how many prompts), and a snippet that loads the LoRA into the stock pipeline (it runs as written)."""
    cfg = json.load(open(os.path.join(out, "config.json")))
    evals = [r for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if r.get("eval")]
    before, after = evals[0], evals[-1]
    lora = os.path.join(latest_checkpoint(out), "lora")
    hub = hub_id(cfg)
    base = hub or cfg.get("model_path") or MODEL_ALIASES.get(cfg["model"], cfg["model"])
    pipe = PIPELINE_CLASS[cfg["family"]]
    two_experts = os.path.isdir(lora + "_transformer_2")
    figures = [k for k in after if k.startswith(("eval/", "train/"))]
    # base_model must be a hub id (the hub rejects a local path): a local model is named in the text instead
    meta = f"base_model: {hub}" if hub else f"# base_model: left out, the base model is the local folder {base}"
    heldout = cfg.get("heldout_prompts")
    seeds = cfg.get("eval_seeds", 1)
    counted = f": {heldout} held-out prompts x {seeds} seed{'s' if seeds > 1 else ''}" if heldout else ""
    lines = ["---", meta, "library_name: diffusers", "pipeline_tag: text-to-video",
             f"tags: [lora, text-to-video, {script.replace('_', '-')}, cleanvideoalign]", "---", "",
             f"# {algorithm} LoRA for {os.path.basename(base.rstrip('/'))}", "",
             f"Trained with `{script}.py` of CleanVideoAlign: {algorithm} ({paper}).", "",
             "| | |", "|---|---|",
             f"| base model | `{base}` ({pipe}{'' if hub else '; a local folder, not on the Hugging Face Hub'}) |",
             f"| reward / judge | `{cfg.get('reward_name') or cfg.get('judge_name')}` |",
             f"| command | `{cfg.get('command') or '(main() called from Python; every argument is in config.json)'}` |"]
    lines += [f"| resumed with | `{c}` |" for c in cfg.get("resumed_with", [])]
    lines += [f"| optimisation steps | {after['step']} |", f"| training videos sampled | {samples_seen} |",
              f"| seed | {cfg['seed']} |", f"| LoRA rank / alpha | {cfg['lora_rank']} / {cfg['lora_alpha'] or cfg['lora_rank']} |",
              f"| ranks (GPUs) | {cfg.get('world_size', 1)} |", "",
              f"Held-out evaluation (`{cfg.get('eval_prompts')}`{counted}), before training and after:", "",
              f"| figure | step {before['step']} | step {after['step']} |", "|---|---|---|"]
    lines += [f"| {k} | {before.get(k, '')} | {after[k]} |" for k in figures]
    lines += ["", "```python", "import diffusers", "import torch", ""]
    if cfg["family"] == "toy":  # pixel space: no VAE (and one expert), which the stock pipeline is told
        lines += [f"pipe = diffusers.{pipe}.from_pretrained(\"{base}\", vae=None, transformer_2=None, torch_dtype=torch.float32)"]
    else:
        lines += [f"pipe = diffusers.{pipe}.from_pretrained(\"{base}\", torch_dtype=torch.bfloat16)"]
    if cfg["family"] == "hunyuan15":  # HunyuanVideo15Pipeline has no load_lora_weights (diffusers 0.42): its DiT loads it
        lines += ["pipe.transformer.load_lora_adapter(\"path/to/this/folder\", "
                  "weight_name=\"pytorch_lora_weights.safetensors\", prefix=\"transformer\")"]
    else:
        lines += ["pipe.load_lora_weights(\"path/to/this/folder\")"]
    if two_experts:  # Wan 2.2 A14B: the low-noise expert's adapter is its own folder
        lines += ["pipe.load_lora_weights(\"path/to/lora_transformer_2\", load_into_transformer_2=True)"]
    lines += ["```", ""]
    if cfg["family"] == "toy":
        lines += ["The toy model samples in pixel space, which the stock pipeline does not: it loads the model and the "
                  "LoRA as above, and CleanVideoAlign samples them (`common.load_model`, `common.sample`).", ""]
    with open(os.path.join(lora, "README.md"), "w") as f:
        f.write("\n".join(lines))
    return os.path.join(lora, "README.md")


def print0(d, *a):
    if d.main:
        print(*a, flush=True)
