"""The text-to-video model families: one class each, holding all that is particular to it.

    model = models.load_model("toy")                  # or an alias (wan2.1-1.3b, ...), a diffusers folder, a hub id
    emb, mask = model.encode_prompts(["a red square moving left"])
    pred = model.denoise(x_t, t, emb, mask)           # f_theta(x_t, t, c) in the family's latent layout
    videos = model.decode(latents)                    # [B, F, C, H, W] in [0, 1], what every reward takes

A family class knows its diffusers pipeline, default video size and sampler settings, size rules, prompt
encoding (exactly as its pipeline encodes), latent geometry, denoiser call convention, decoding, sampler
timesteps and step, and how its LoRA is saved for the stock pipeline. Everything else (the CFG sampler, the
training math, LoRA set-up, checkpoints) is family-agnostic and lives in common.py, calling these methods.
Adding a family = one class here + one FAMILIES entry + a tiny random model in tests/tiny_models.py.

  Toy         our pixel-space WanTransformer3DModel (assets/toy), flow matching, [B, C, F, H, W]
  Wan         Wan 2.1 / 2.2 (WanTransformer3DModel + AutoencoderKLWan; A14B's two experts), flow, [B, C, F, H, W]
  CogVideoX   CogVideoX 1.0 / 1.5 (DDIM or DPM, v-prediction), [B, F, C, H, W]
  LTX         LTX-Video (flow matching, tokens packed inside the denoiser call), [B, C, F, H, W] outside
  ModelScope  ModelScope UNet3DConditionModel (eps-prediction, 2D VAE per frame), [B, C, F, H, W]
  Hunyuan15   HunyuanVideo 1.5 (Qwen2.5-VL + ByT5 text, HunyuanVideo15Transformer3DModel + its causal VAE), flow
Latents stay in the family's own layout everywhere; videos handed to rewards are [B, F, C, H, W] in [0, 1].
"""
import collections
import json
import os
import re

import torch

import common
import distributed

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
PROMPT_CACHE_SIZE = 128  # prompts whose embeddings stay on the device (one Wan UMT5 embedding: 512 x 4096)


def _causal_prefix(frame, stride):
    """Latent frames a causal video VAE needs to decode pixel frame `frame` (latent 0 -> pixel 0,
    latent k -> pixels stride*(k-1)+1 .. stride*k)."""
    return -(-frame // stride) + 1


class VideoModel:
    """Everything a loop needs about one text-to-video model: its components, and (in the family classes below)
    the family's conventions. The methods here are the defaults the families share."""
    family = None  # the short name (FAMILIES key) that configs and messages use
    pipeline = None  # the diffusers pipeline class (model_index.json's _class_name)
    denoiser_folder = "transformer"
    defaults = {}  # video size, sampler steps, guidance and frame rate (the family's own)
    frames_rule, frames_text, spatial_multiple = (lambda f: (f - 1) % 4 == 0), "4k+1 (e.g. 17, 33, 81)", 16
    text_mask = False  # whether the denoiser takes the text attention mask
    context_parallel = False  # --cp: the denoiser trains under diffusers' context parallelism (its `_cp_plan`)

    def __init__(self, path, prediction, tokenizer, text_encoder, denoiser, vae, scheduler, max_sequence_length,
                 expand_timesteps=False, denoiser_2=None, boundary=None, tokenizer_2=None, text_encoder_2=None):
        self.path = path
        self.prediction = prediction  # "flow", "v" or "eps": what the denoiser predicts
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.denoiser, self.vae, self.scheduler = denoiser, vae, scheduler  # vae: None in pixel space (toy)
        self.max_sequence_length = max_sequence_length
        self.expand_timesteps = expand_timesteps  # Wan 2.2 TI2V gives the timestep per token
        self.denoiser_2 = denoiser_2  # Wan 2.2 A14B's low-noise expert (`transformer_2`), else None
        self.boundary = boundary  # timesteps >= boundary go to `denoiser` (high noise), the others to `denoiser_2`
        self.tokenizer_2, self.text_encoder_2 = tokenizer_2, text_encoder_2  # HunyuanVideo 1.5's ByT5
        self.prompt_cache = collections.OrderedDict()

    @property
    def device(self):
        return next(self.denoiser.parameters()).device

    @property
    def experts(self):
        """The denoiser(s): one, or Wan 2.2 A14B's two (high-noise, low-noise)."""
        return [self.denoiser] if self.denoiser_2 is None else [self.denoiser, self.denoiser_2]

    # --- before loading: defaults and size rules, from the folder's config files only ---------------------------
    @classmethod
    def model_defaults(cls, path):
        return dict(cls.defaults)

    @classmethod
    def check_video_size(cls, num_frames, height, width, path=None):
        """Raise early for a frame count / resolution the family's VAE and patching cannot take (`path`: the
        model folder, for rules that its config files decide)."""
        if not cls.frames_rule(num_frames):
            raise ValueError(f"--num-frames {num_frames} is not valid for {cls.family}: it must be {cls.frames_text}")
        if height % cls.spatial_multiple or width % cls.spatial_multiple:
            raise ValueError(f"--height/--width {height}x{width} must be multiples of {cls.spatial_multiple} "
                             f"for {cls.family}")

    @classmethod
    def cp_sizes(cls, path, num_frames, height, width):
        """--cp: (attention heads, video tokens) of the denoiser at this size, from the folder's config files."""
        raise NotImplementedError

    @classmethod
    def max_length(cls, index, tokenizer):
        raise NotImplementedError

    # --- prompts -------------------------------------------------------------------------------------------------
    def text_embeddings(self, ids, mask):
        return self.text_encoder(ids)[0]  # CogVideoX, LTX and CLIP encode the padded ids without a mask

    @torch.no_grad()
    def encode_prompts(self, prompts):
        """(embeddings [B, L, D], attention mask [B, L] or None) exactly as the family's pipeline builds them.
        Repeated prompts (the empty negative prompt, candidates of one prompt) are encoded once; the cache keeps
        the PROMPT_CACHE_SIZE most recently used."""
        cache = self.prompt_cache
        missing = [p for p in dict.fromkeys(prompts) if p not in cache]
        if missing:
            dev = self.text_encoder.device
            t = self.tokenizer(missing, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                               add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
            ids, mask = t.input_ids.to(dev), t.attention_mask.to(dev)
            emb = self.text_embeddings(ids, mask)
            for p, e, m in zip(missing, emb, mask):
                cache[p] = (e.clone(), m.bool())  # a clone: a view would keep its whole batch alive
        for p in prompts:
            cache.move_to_end(p)
        emb = torch.stack([cache[p][0] for p in prompts])
        mask = torch.stack([cache[p][1] for p in prompts])
        while len(cache) > PROMPT_CACHE_SIZE:
            cache.popitem(last=False)  # least recently used first
        return emb, (mask if self.text_mask else None)

    # --- the denoiser --------------------------------------------------------------------------------------------
    def enable_context_parallel(self, mesh):
        """--cp: diffusers' own context parallelism on every expert. The ranks of `mesh`'s "ulysses" dimension
        share each video: the plan splits the tokens after patchifying, each attention trades sequence shards
        for head shards (all-to-all) and back, and the output is gathered whole on every rank. Ulysses, not ring:
        diffusers' ring attention needs a backend returning the softmax's log-sum-exp (flash / cuDNN, GPU only)
        and the native backend refuses it ("Native attention does not support return_lse=True"); Ulysses has a
        backward on every backend (tests/test_context_parallel.py compares output and gradients)."""
        from diffusers import ContextParallelConfig
        for den in self.experts:
            with _accelerator_count_on_cpu():
                den.enable_parallelism(config=ContextParallelConfig(ulysses_degree=mesh["ulysses"].size(), mesh=mesh))

    def latent_shape(self, num_frames, height, width):
        """Per-video latent shape in the family's layout."""
        raise NotImplementedError

    def denoise(self, latents, timestep, embeds, mask=None):
        """f_theta(x_t, t, c) in the latent layout; `timestep` is [B] in the scheduler's units. With Wan 2.2
        A14B's two experts each sample goes to the expert that owns its timestep (t >= boundary: high-noise
        `transformer`, else low-noise `transformer_2`, as WanPipeline switches), so a DPO/RWR batch of mixed
        timesteps trains both and VADER's last (low-noise) steps reach `transformer_2` only."""
        if self.denoiser_2 is None:
            return self.call_denoiser(self.denoiser, latents, timestep, embeds, mask)
        high = timestep >= self.boundary
        if high.all() or not high.any():
            return self.call_denoiser(self.denoiser if high.all() else self.denoiser_2, latents, timestep, embeds,
                                      mask)
        out = None
        for den, idx in ((self.denoiser, high), (self.denoiser_2, ~high)):
            part = self.call_denoiser(den, latents[idx], timestep[idx], embeds[idx],
                                      None if mask is None else mask[idx])
            out = part.new_zeros((latents.shape[0], *part.shape[1:])) if out is None else out
            out = out.index_put((idx,), part)
        return out

    def call_denoiser(self, den, latents, timestep, embeds, mask=None):
        """One denoiser's forward in the family's call convention."""
        raise NotImplementedError

    def decode(self, latents, frames=None, prefix_grad=True):
        """Latents -> videos [B, F, C, H, W] in [0, 1]. `frames` (pixel-frame indices) decodes only what a
        reward needs: exactly those frames for pixel/2D-VAE models, the causal prefix up to the last one
        for the causal 3D VAEs (frame k depends only on latents <= k). prefix_grad=False (Wan, VADER's
        --decoder-grad own): see Wan.decode."""
        raise NotImplementedError

    # --- the sampler's schedule and step -------------------------------------------------------------------------
    def set_timesteps(self, steps, shape):
        sch = self.scheduler
        sch.set_timesteps(steps, device=self.device)
        if hasattr(sch, "set_begin_index"):
            sch.set_begin_index(0)
        return sch.timesteps

    def scale_model_input(self, x, t):
        return x

    def step(self, pred, t, latents, i, timesteps, generators):
        """One scheduler step x_t -> x_{t-1}; stochastic schedulers draw from the per-sample `generators`."""
        sch = self.scheduler
        kw = {"generator": generators} if "generator" in sch.step.__code__.co_varnames else {}
        return sch.step(pred, t, latents, return_dict=False, **kw)[0]

    # --- saving ------------------------------------------------------------------------------------------------
    def save_lora(self, folder, main=True):
        """Write the LoRA in the diffusers format that the stock pipeline's `load_lora_weights` reads. Wan 2.2
        A14B's low-noise expert gets its own file in `<folder>_transformer_2`, loaded with
        `load_lora_weights(..., load_into_transformer_2=True)`."""
        if self.denoiser_2 is not None:
            self._save_lora(self.denoiser_2, folder + "_transformer_2", main)
        self._save_lora(self.denoiser, folder, main)

    def _save_lora(self, den, folder, main):
        from peft.utils import get_peft_model_state_dict
        # under FSDP every rank gathers the full adapter (a collective) and only rank 0 writes it
        state = {k: distributed.full(v).detach().cpu().contiguous() for k, v in get_peft_model_state_dict(den).items()}
        if not main:
            return
        # the LoraConfig goes along as metadata: without it load_lora_weights assumes lora_alpha = rank
        self.write_lora(folder, state, den.peft_config["default"].to_dict())

    def write_lora(self, folder, state, config):
        import diffusers
        getattr(diffusers, self.pipeline).save_lora_weights(folder, transformer_lora_layers=state,
                                                            transformer_lora_adapter_metadata=config)

    @classmethod
    def card_snippet(cls, base):
        """The model card's lines that load the base model and the LoRA into the stock pipeline."""
        return [f"pipe = diffusers.{cls.pipeline}.from_pretrained(\"{base}\", torch_dtype=torch.bfloat16)",
                "pipe.load_lora_weights(\"path/to/this/folder\")"]


class Wan(VideoModel):
    """Wan 2.1 / 2.2: UMT5 text (masked), WanTransformer3DModel, the causal AutoencoderKLWan (4x time, 8x or 16x
    space); 2.2 A14B has two experts split at `boundary_ratio`, 2.2 TI2V 5B a timestep per token."""
    family, pipeline = "wan", "WanPipeline"
    context_parallel = True
    defaults = dict(num_frames=33, height=480, width=832, sample_steps=30, guidance=5.0, fps=16)

    @classmethod
    def model_defaults(cls, path):
        with open(os.path.join(path, "model_index.json")) as f:
            index = json.load(f)
        if index.get("transformer_2", [None])[0] is not None:  # Wan 2.2 A14B (its sample_guide_scale)
            return dict(cls.defaults, guidance=4.0, guidance_2=3.0)
        if index.get("expand_timesteps"):  # Wan 2.2 TI2V 5B renders 24 fps
            return dict(cls.defaults, fps=24)
        return dict(cls.defaults)

    @classmethod
    def check_video_size(cls, num_frames, height, width, path=None):
        super().check_video_size(num_frames, height, width)
        if path and height and width and (height % 32 or width % 32):
            with open(os.path.join(path, "model_index.json")) as f:
                ti2v = json.load(f).get("expand_timesteps")
            if ti2v:  # Wan 2.2 TI2V 5B: a 16x VAE and 2x2 patches
                raise ValueError(f"--height {height} --width {width}: Wan 2.2 TI2V 5B needs multiples of 32 "
                                 f"(its 16x VAE, then 2x2 patches), e.g. 704x1280 for 720p")

    @classmethod
    def cp_sizes(cls, path, num_frames, height, width):
        with open(os.path.join(path, "transformer", "config.json")) as f:
            den = json.load(f)
        with open(os.path.join(path, "vae", "config.json")) as f:
            vae = json.load(f)
        st, ss = vae.get("scale_factor_temporal") or 4, vae.get("scale_factor_spatial") or 8
        pt, ph, pw = den.get("patch_size", (1, 2, 2))
        tokens = ((num_frames - 1) // st + 1) // pt * (height // ss // ph) * (width // ss // pw)
        return den.get("num_attention_heads", 40), tokens  # (the text is not split: Wan's cross-attention is local)

    @classmethod
    def max_length(cls, index, tokenizer):
        return 512

    def text_embeddings(self, ids, mask):  # encode with the mask, zero everything past the text
        return self.text_encoder(ids, mask).last_hidden_state * mask[..., None]

    def latent_shape(self, num_frames, height, width):
        st, ss = self.vae.config.scale_factor_temporal, self.vae.config.scale_factor_spatial
        return (self.denoiser.config.in_channels, (num_frames - 1) // st + 1, height // ss, width // ss)

    def call_denoiser(self, den, latents, timestep, embeds, mask=None):
        x = latents.to(den.dtype)
        if self.expand_timesteps:  # Wan 2.2 TI2V: one timestep per (latent-frame, 2x2) token
            p = den.config.patch_size
            n = (x.shape[2] // p[0]) * (x.shape[3] // p[1]) * (x.shape[4] // p[2])
            timestep = timestep[:, None].expand(-1, n)
        return den(x, timestep=timestep, encoder_hidden_states=embeds, return_dict=False)[0]

    def decode(self, latents, frames=None, prefix_grad=True):
        """prefix_grad=False (VADER's --decoder-grad own): under autograd, only the latent frames that hold a
        requested frame keep activations; the rest of the causal prefix decodes to the same values without."""
        vae = self.vae
        x = latents.to(vae.dtype)
        if frames is not None:
            x = x[:, :, : _causal_prefix(max(frames), vae.config.scale_factor_temporal)]
        mean = torch.tensor(vae.config.latents_mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1, 1)
        if frames is not None and not prefix_grad and torch.is_grad_enabled():
            own = {_causal_prefix(f, vae.config.scale_factor_temporal) - 1 for f in frames}
            video = self._decode_own_grad(x * std + mean, own).permute(0, 2, 1, 3, 4)
        else:
            video = vae.decode(x * std + mean, return_dict=False)[0].permute(0, 2, 1, 3, 4)
        if frames is not None:
            video = video[:, frames]
        return (video.float() / 2 + 0.5).clamp(0, 1)

    def _decode_own_grad(self, z, grad_latents):
        """AutoencoderKLWan._decode (diffusers 0.42): latent frame by latent frame through the decoder's causal
        feature cache, with autograd on only for the latent frames in `grad_latents`. The other frames decode to
        the same values and keep no activations: the reward's gradient reaches the latent frames of the decoded
        frames but not, through the cache, the earlier ones (a truncation, like VADER's K for sampler steps)."""
        from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify
        vae = self.vae
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


class Toy(VideoModel):
    """Our toy model: a small WanTransformer3DModel that denoises PIXELS (no VAE), with a word-level T5 text
    encoder; trained by pretrain_toy.py. It is called and encoded exactly as Wan is."""
    family, pipeline = "toy", "WanPipeline"
    text_embeddings = Wan.text_embeddings
    call_denoiser = Wan.call_denoiser

    @classmethod
    def model_defaults(cls, path):
        with open(os.path.join(path, "model_index.json")) as f:
            index = json.load(f)
        return dict(num_frames=index.get("num_frames", 8), height=index.get("height", 32),
                    width=index.get("width", 32), sample_steps=10, guidance=3.0, fps=index.get("fps", 8))

    @classmethod
    def check_video_size(cls, num_frames, height, width, path=None):
        """Pixel space: the denoiser's patches (frames, rows, columns per token; its config.json) set the rule."""
        pt, ph, pw = (1, 4, 4)
        if path:
            with open(os.path.join(path, cls.denoiser_folder, "config.json")) as f:
                pt, ph, pw = json.load(f)["patch_size"]
        if not (num_frames >= 2 and num_frames % pt == 0):
            text = "at least 2" + (f" and a multiple of {pt} (the model's {pt} frames per token)" if pt > 1 else "")
            raise ValueError(f"--num-frames {num_frames} is not valid for toy: it must be {text}")
        if height % ph or width % ph:
            raise ValueError(f"--height/--width {height}x{width} must be multiples of {ph} for toy")

    @classmethod
    def max_length(cls, index, tokenizer):
        return index.get("max_sequence_length", 16)

    def latent_shape(self, num_frames, height, width):
        return (self.denoiser.config.in_channels, num_frames, height, width)

    def decode(self, latents, frames=None, prefix_grad=True):
        video = latents.permute(0, 2, 1, 3, 4)  # pixel space: latents are [B, C, F, H, W] in [-1, 1]
        video = video if frames is None else video[:, frames]
        return (video.float() / 2 + 0.5).clamp(0, 1)

    @classmethod
    def card_snippet(cls, base):  # pixel space: no VAE (and one expert), which the stock pipeline is told
        return [f"pipe = diffusers.{cls.pipeline}.from_pretrained(\"{base}\", vae=None, transformer_2=None, "
                f"torch_dtype=torch.float32)", "pipe.load_lora_weights(\"path/to/this/folder\")"]


class CogVideoX(VideoModel):
    """CogVideoX 1.0 / 1.5: T5 text, latents [B, F, C, H, W], v-prediction with DDIM or the DPM scheduler, 3D
    rotary embeddings, a VAE that decodes latent frames in batches."""
    family, pipeline = "cogvideox", "CogVideoXPipeline"
    defaults = dict(num_frames=49, height=480, width=720, sample_steps=30, guidance=6.0, fps=8)
    frames_text = "4k+1 (e.g. 13, 49)"

    @classmethod
    def max_length(cls, index, tokenizer):
        return 226

    def latent_shape(self, num_frames, height, width):
        ss = 2 ** (len(self.vae.config.block_out_channels) - 1)
        frames = (num_frames - 1) // self.vae.config.temporal_compression_ratio + 1
        pt = self.denoiser.config.patch_size_t
        if pt is not None and frames % pt:
            raise ValueError(f"CogVideoX 1.5 needs latent frames divisible by {pt}: choose --num-frames so that "
                             f"(num_frames - 1) / 4 + 1 is a multiple of {pt}")
        return (frames, self.denoiser.config.in_channels, height // ss, width // ss)

    def rotary(self, latents):
        from diffusers.models.embeddings import get_3d_rotary_pos_embed
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
        cfg = self.denoiser.config
        if not cfg.use_rotary_positional_embeddings:
            return None
        gh, gw = latents.shape[3] // cfg.patch_size, latents.shape[4] // cfg.patch_size
        bw, bh = cfg.sample_width // cfg.patch_size, cfg.sample_height // cfg.patch_size
        if cfg.patch_size_t is None:
            crops = get_resize_crop_region_for_grid((gh, gw), bw, bh)
            return get_3d_rotary_pos_embed(cfg.attention_head_dim, crops, (gh, gw), latents.shape[1],
                                           device=latents.device)
        frames = (latents.shape[1] + cfg.patch_size_t - 1) // cfg.patch_size_t
        return get_3d_rotary_pos_embed(cfg.attention_head_dim, None, (gh, gw), frames, grid_type="slice",
                                       max_size=(bh, bw), device=latents.device)

    def call_denoiser(self, den, latents, timestep, embeds, mask=None):
        x = latents.to(den.dtype)
        return den(hidden_states=x, encoder_hidden_states=embeds, timestep=timestep,
                   image_rotary_emb=self.rotary(x), return_dict=False)[0]

    def decode(self, latents, frames=None, prefix_grad=True):
        vae = self.vae
        x = latents.to(vae.dtype)
        if frames is not None:  # the VAE decodes latent frames in batches (first b + n % b, then b at a time)
            # and normalises within each: cut at the first batch boundary of the full decode past the causal
            # prefix (at worst all n), so the prefix decodes exactly as in the full decode
            n, b = x.shape[1], vae.num_latent_frames_batch_size
            need = _causal_prefix(max(frames), vae.config.temporal_compression_ratio)
            x = x[:, : min(n % b + b * max(1, -(-(need - n % b) // b)), n)]
        video = vae.decode(x.permute(0, 2, 1, 3, 4) / vae.config.scaling_factor).sample.permute(0, 2, 1, 3, 4)
        if frames is not None:
            video = video[:, frames]
        return (video.float() / 2 + 0.5).clamp(0, 1)

    def set_timesteps(self, steps, shape):
        self._old_x0 = None  # the DPM scheduler carries the previous x0 prediction from step to step
        return super().set_timesteps(steps, shape)

    def scale_model_input(self, x, t):
        return self.scheduler.scale_model_input(x, t) if hasattr(self.scheduler, "scale_model_input") else x

    def step(self, pred, t, latents, i, timesteps, generators):
        if type(self.scheduler).__name__ != "CogVideoXDPMScheduler":
            return super().step(pred, t, latents, i, timesteps, generators)
        latents, self._old_x0 = self.scheduler.step(pred, self._old_x0, t, timesteps[i - 1] if i > 0 else None,
                                                    latents, generator=generators, return_dict=False)
        return latents


class LTX(VideoModel):
    """LTX-Video: T5 text (the mask goes to the denoiser), latents packed into tokens inside the call (patch
    sizes 1), sigmas shifted by the token count as LTXPipeline does."""
    family, pipeline = "ltx", "LTXPipeline"
    # (no --cp: diffusers 0.42.1 ships a plan for LTX, but its Ulysses path fails on the native backend once the
    # text mask is passed, as LTXPipeline does: "The size of tensor a (2) must match the size of tensor b (4)")
    defaults = dict(num_frames=65, height=480, width=704, sample_steps=30, guidance=3.0, fps=25)
    frames_rule, frames_text, spatial_multiple = (lambda f: (f - 1) % 8 == 0), "8k+1 (e.g. 9, 17, 161)", 32
    text_mask = True

    @classmethod
    def max_length(cls, index, tokenizer):
        return 128

    def latent_shape(self, num_frames, height, width):
        st, ss = self.vae.temporal_compression_ratio, self.vae.spatial_compression_ratio
        return (self.denoiser.config.in_channels, (num_frames - 1) // st + 1, height // ss, width // ss)

    def call_denoiser(self, den, latents, timestep, embeds, mask=None):
        x = latents.to(den.dtype)  # pack [B, C, F, H, W] -> tokens [B, F*H*W, C], then back
        B, C, F, H, W = x.shape
        tokens = x.permute(0, 2, 3, 4, 1).reshape(B, F * H * W, C)
        st, ss = self.vae.temporal_compression_ratio, self.vae.spatial_compression_ratio
        out = den(hidden_states=tokens, encoder_hidden_states=embeds, timestep=timestep, encoder_attention_mask=mask,
                  num_frames=F, height=H, width=W, rope_interpolation_scale=(st / 25, ss, ss), return_dict=False)[0]
        return out.reshape(B, F, H, W, -1).permute(0, 4, 1, 2, 3)

    def decode(self, latents, frames=None, prefix_grad=True):
        vae = self.vae
        x = latents.to(vae.dtype)
        mean = vae.latents_mean.view(1, -1, 1, 1, 1).to(x)
        std = vae.latents_std.view(1, -1, 1, 1, 1).to(x)
        x = x * std / vae.config.scaling_factor + mean
        t = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype) if vae.config.timestep_conditioning else None
        video = vae.decode(x, t, return_dict=False)[0].permute(0, 2, 1, 3, 4)
        if frames is not None:
            video = video[:, frames]
        return (video.float() / 2 + 0.5).clamp(0, 1)

    def set_timesteps(self, steps, shape):
        from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift
        sch, c = self.scheduler, self.scheduler.config
        mu = calculate_shift(shape[1] * shape[2] * shape[3], c.get("base_image_seq_len", 256),
                             c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        sch.set_timesteps(sigmas=[1.0 - i * (1 - 1 / steps) / max(steps - 1, 1) for i in range(steps)],
                          device=self.device, mu=mu)
        if hasattr(sch, "set_begin_index"):
            sch.set_begin_index(0)
        return sch.timesteps


class ModelScope(VideoModel):
    """ModelScope text-to-video: CLIP text, UNet3DConditionModel (eps-prediction), a 2D VAE frame by frame; the
    stock pipeline steps the frames as images."""
    family, pipeline, denoiser_folder = "modelscope", "TextToVideoSDPipeline", "unet"
    defaults = dict(num_frames=16, height=256, width=256, sample_steps=25, guidance=9.0, fps=8)
    frames_rule, frames_text, spatial_multiple = (lambda f: f >= 1), "at least 1", 8

    @classmethod
    def max_length(cls, index, tokenizer):
        return tokenizer.model_max_length

    def text_embeddings(self, ids, mask):
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            return self.text_encoder(ids, attention_mask=mask)[0]
        return self.text_encoder(ids)[0]

    def latent_shape(self, num_frames, height, width):
        ss = 2 ** (len(self.vae.config.block_out_channels) - 1)  # 2D VAE, one latent per frame
        return (self.denoiser.config.in_channels, num_frames, height // ss, width // ss)

    def call_denoiser(self, den, latents, timestep, embeds, mask=None):
        return den(latents.to(den.dtype), timestep, encoder_hidden_states=embeds, return_dict=False)[0]

    def decode(self, latents, frames=None, prefix_grad=True):
        vae = self.vae
        x = latents.to(vae.dtype)
        if frames is not None:  # a 2D VAE frame by frame, so a frame subset costs only those frames
            x = x[:, :, frames]
        B, C, F, H, W = x.shape
        img = vae.decode(x.permute(0, 2, 1, 3, 4).reshape(B * F, C, H, W) / vae.config.scaling_factor).sample
        video = img.reshape(B, F, *img.shape[1:])
        return (video.float() / 2 + 0.5).clamp(0, 1)

    def scale_model_input(self, x, t):
        return self.scheduler.scale_model_input(x, t) if hasattr(self.scheduler, "scale_model_input") else x

    def step(self, pred, t, latents, i, timesteps, generators):
        Bc, C, F, H, W = latents.shape  # the stock pipeline steps frames as images
        step = self.scheduler.step(pred.permute(0, 2, 1, 3, 4).reshape(Bc * F, C, H, W), t,
                                   latents.permute(0, 2, 1, 3, 4).reshape(Bc * F, C, H, W)).prev_sample
        return step.reshape(Bc, F, C, H, W).permute(0, 2, 1, 3, 4)

    def write_lora(self, folder, state, config):
        import diffusers
        diffusers.TextToVideoSDPipeline.save_lora_weights(folder, unet_lora_layers=state,
                                                          unet_lora_adapter_metadata=config)


class Hunyuan15(VideoModel):
    """HunyuanVideo 1.5: two text streams (Qwen2.5-VL hidden states + ByT5 glyph text), the DiT's input gets zero
    condition and mask channels and zero image tokens (text-to-video), its causal VAE (4x time, 16x space)."""
    family, pipeline = "hunyuan15", "HunyuanVideo15Pipeline"
    # HunyuanVideo15Pipeline's own defaults: 121 frames, 50 steps, 480x848 (its 16:9 bucket for target_size 640),
    # guidance 6.0 (the 480p/720p guider), 24 fps; model_defaults reads the checkpoint's guider and target size
    defaults = dict(num_frames=121, height=480, width=848, sample_steps=50, guidance=6.0, fps=24)
    frames_text = "4k+1 (e.g. 33, 121)"  # VAE: 4x in time (causal), 16x in space; the DiT's patches are 1x1x1
    IMAGE_TOKENS = 729  # HunyuanVideo15Pipeline.vision_num_semantic_tokens: the (all-zero) image tokens of T2V

    @classmethod
    def model_defaults(cls, path):
        defaults = dict(cls.defaults)  # guidance lives in the guider's config (1.0 for the step-distilled
        # checkpoints), the default size in the transformer's target_size (480p / 720p)
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

    @classmethod
    def max_length(cls, index, tokenizer):
        return 1000  # Qwen2.5-VL's 1000 tokens after the template (the pipeline's)

    @torch.no_grad()
    def encode_prompts(self, prompts):
        """The two text streams, packed into encode_prompts' (embeddings, mask) pair so the sampler and the loops
        pass them on untouched: rows [0, L) are Qwen2.5-VL's hidden states (layer -3, after the chat template's
        first 108 tokens are cropped), rows [L, L + 256) ByT5's embedding of the quoted glyph text (zeros and
        mask 0 when the prompt quotes none); features are zero-padded to the wider of the two. call_denoiser
        unpacks. The encoding calls the stock pipeline's own static helpers with their defaults, which are the
        pipeline's settings (system prompt, crop 108, 1000 + 256 tokens): re-implementing the chat template, the
        crop and the glyph-text regex would only be a second copy to keep in sync (tests/test_hunyuan15.py checks
        the result against HunyuanVideo15Pipeline.encode_prompt)."""
        from diffusers import HunyuanVideo15Pipeline as P
        cache = self.prompt_cache
        missing = [p for p in dict.fromkeys(prompts) if p not in cache]
        if missing:
            dev = self.text_encoder.device
            e1, m1 = P._get_mllm_prompt_embeds(self.text_encoder, self.tokenizer, missing, dev,
                                               tokenizer_max_length=self.max_sequence_length)
            e2, m2 = P._get_byt5_prompt_embeds(self.tokenizer_2, self.text_encoder_2, missing, dev)
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

    def latent_shape(self, num_frames, height, width):  # the VAE's channels (the DiT adds condition + mask ones)
        st, ss = self.vae.temporal_compression_ratio, self.vae.spatial_compression_ratio
        return (self.vae.config.latent_channels, (num_frames - 1) // st + 1, height // ss, width // ss)

    def call_denoiser(self, den, latents, timestep, embeds, mask=None):
        # T2V, as HunyuanVideo15Pipeline calls it: the input is [x, zero condition latents, zero mask channel] on
        # channels, the image tokens all zero (which the DiT reads as "no image"), the timestep in the DiT's dtype;
        # the two text streams come packed by encode_prompts
        x = latents.to(den.dtype)
        B, C, F, H, W = x.shape
        cfg, L = den.config, self.max_sequence_length
        embeds, mask = embeds.to(den.dtype), mask.to(den.dtype)
        return den(torch.cat([x, x.new_zeros(B, C + 1, F, H, W)], 1), timestep=timestep.to(den.dtype),
                   encoder_hidden_states=embeds[:, :L, : cfg.text_embed_dim], encoder_attention_mask=mask[:, :L],
                   encoder_hidden_states_2=embeds[:, L:, : cfg.text_embed_2_dim], encoder_attention_mask_2=mask[:, L:],
                   image_embeds=x.new_zeros(B, self.IMAGE_TOKENS, cfg.image_embed_dim), return_dict=False)[0]

    def decode(self, latents, frames=None, prefix_grad=True):
        # a causal 3D VAE (4x in time): a frame subset needs only its causal prefix. One video per decoder call:
        # diffusers 0.42's VAE mid-block attention builds a [B, N, N] mask that breaks on B > 1 (diffusers PR
        # #13133); the stock pipeline decodes a batch only with vae.enable_slicing()
        vae = self.vae
        x = latents.to(vae.dtype)
        if frames is not None:
            x = x[:, :, : _causal_prefix(max(frames), vae.temporal_compression_ratio)]
        x = x / vae.config.scaling_factor
        video = torch.cat([vae.decode(z, return_dict=False)[0] for z in x.split(1)]).permute(0, 2, 1, 3, 4)
        if frames is not None:
            video = video[:, frames]
        return (video.float() / 2 + 0.5).clamp(0, 1)

    def set_timesteps(self, steps, shape):  # HunyuanVideo15Pipeline: sigmas linspace(1, 0, steps + 1)[:-1], shifted
        import numpy as np
        sch = self.scheduler
        sch.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1], device=self.device)
        if hasattr(sch, "set_begin_index"):
            sch.set_begin_index(0)
        return sch.timesteps

    def write_lora(self, folder, state, config):
        # HunyuanVideo15Pipeline has no LoRA loader mixin (no load_lora_weights) in diffusers 0.42: the file is the
        # standard one (keys "transformer.*" + the LoraConfig metadata) that its transformer reads with
        # `pipe.transformer.load_lora_adapter(folder, prefix="transformer")`
        from diffusers.loaders import HunyuanVideoLoraLoaderMixin
        HunyuanVideoLoraLoaderMixin.save_lora_weights(folder, transformer_lora_layers=state,
                                                      transformer_lora_adapter_metadata=config)

    @classmethod
    def card_snippet(cls, base):  # no load_lora_weights (diffusers 0.42): its DiT loads the adapter
        return [f"pipe = diffusers.{cls.pipeline}.from_pretrained(\"{base}\", torch_dtype=torch.bfloat16)",
                "pipe.transformer.load_lora_adapter(\"path/to/this/folder\", "
                "weight_name=\"pytorch_lora_weights.safetensors\", prefix=\"transformer\")"]


FAMILIES = {cls.family: cls for cls in (Toy, Wan, CogVideoX, LTX, ModelScope, Hunyuan15)}
PIPELINE_FAMILY = {cls.pipeline: name for name, cls in FAMILIES.items() if name != "toy"}  # model_index -> family


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
    folder = os.path.join(path, FAMILIES[family].denoiser_folder)
    if not os.path.isdir(folder) or not any(f.endswith((".safetensors", ".bin")) for f in os.listdir(folder)):
        raise FileNotFoundError(f"no weights in {folder}: the model folder is incomplete (download it fully, or run "
                                f"`python pretrain_toy.py --stop-at 11000 --out assets/toy --overwrite` to rebuild "
                                f"the toy model: about 4 h on 2 CPU cores)")
    return path, family


def model_defaults(path, family):
    """The family's defaults (the toy model's come from its model_index.json); no weights are read."""
    return FAMILIES[family].model_defaults(path)


def check_video_size(family, num_frames, height, width, path=None):
    """Raise early for a frame count / resolution the family's VAE and patching cannot take."""
    FAMILIES[family].check_video_size(num_frames, height, width, path)


class _accelerator_count_on_cpu:
    """diffusers' enable_parallelism picks its device as `rank % torch.accelerator.device_count()`, which is a
    division by zero on a CPU-only machine (the mesh we pass is what it uses): count one device there."""

    def __enter__(self):
        self.count = torch.accelerator.device_count
        if self.count() == 0:
            torch.accelerator.device_count = lambda: 1

    def __exit__(self, *exc):
        torch.accelerator.device_count = self.count


def check_context_parallel(family, cp, world, num_frames, height, width, path):
    """--cp N: raise before anything loads for what diffusers' Ulysses attention cannot split."""
    if cp == 1:
        return
    cls = FAMILIES[family]
    if cp < 1:
        raise ValueError(f"--cp {cp}: pass 1 (off) or the number of ranks that share each video")
    if not cls.context_parallel:
        raise ValueError(f"--cp {cp}: {family}'s denoiser does not train under diffusers' context parallelism (Wan "
                         f"2.1 / 2.2 do; docs/real_models.md says why): drop --cp (--fsdp shards the weights on any "
                         f"family)")
    if world % cp:
        raise ValueError(f"--cp {cp} must divide the number of ranks ({world}): launch torchrun --nproc_per_node with "
                         f"a multiple of {cp}, or pass a --cp that divides {world}")
    heads, tokens = cls.cp_sizes(path, num_frames, height, width)
    if heads % cp:
        raise ValueError(f"--cp {cp}: Ulysses attention splits the {heads} attention heads over the context group; "
                         f"pass a --cp that divides {heads}")
    if tokens % cp:
        raise ValueError(f"--cp {cp}: a {num_frames}x{height}x{width} video is {tokens} tokens, not divisible by {cp}: "
                         f"pick --num-frames/--height/--width whose token count {cp} divides, or another --cp")


def fill_video_args(args, path, family):
    """Fill unset --num-frames/--height/--width/--guidance from the model's defaults and check them,
    before anything heavy loads."""
    common.check_positive(args, "num_frames", "height", "width")  # (0 passes every divisibility rule below)
    defaults = model_defaults(path, family)
    for k in ("num_frames", "height", "width", "guidance", "guidance_2", "fps"):
        if getattr(args, k) is None:
            setattr(args, k, defaults.get(k))
    check_video_size(family, args.num_frames, args.height, args.width, path)
    check_context_parallel(family, getattr(args, "cp", 1), int(os.environ.get("WORLD_SIZE", 1)), args.num_frames,
                           args.height, args.width, path)
    per_block = getattr(args, "grad_checkpointing", False) and not hasattr(args, "backprop_steps")  # (VADER's flag
    if family == "modelscope" and per_block:  # checkpoints whole sampler calls, which works for every family)
        raise ValueError("--grad-checkpointing: diffusers' UNet3DConditionModel (ModelScope) does not support "
                         "gradient checkpointing; drop the flag for this model")


def load_model(name_or_path, device="cpu", dtype=torch.float32, denoiser_dtype=torch.float32, context_mesh=None):
    """Load tokenizer, text encoder, denoiser, VAE and scheduler through the ordinary from_pretrained.
    Frozen parts are cast to `dtype`, the trainable denoiser to `denoiser_dtype`; `context_mesh` (--cp): the
    denoiser's tokens split over its "ulysses" ranks (VideoModel.enable_context_parallel)."""
    import diffusers
    import transformers

    path, family = resolve_model(name_or_path)
    cls = FAMILIES[family]
    with open(os.path.join(path, "model_index.json")) as f:
        index = json.load(f)

    def component(name, dtype=None):
        library, cls_name = index[name]
        if dtype is None:  # tokenizer, scheduler
            return getattr(transformers if library == "transformers" else diffusers, cls_name).from_pretrained(
                os.path.join(path, name))
        # the dtype goes to from_pretrained, not .to(): both libraries then keep the modules a model marks
        # `_keep_in_fp32_modules` (Wan's norms and time embedding, T5's `wo`) in fp32, as their pipelines do
        if library == "transformers":
            model = getattr(transformers, cls_name).from_pretrained(os.path.join(path, name), dtype=dtype)
        else:
            model = getattr(diffusers, cls_name).from_pretrained(os.path.join(path, name), torch_dtype=dtype)
        return model.to(device)

    tokenizer = component("tokenizer")
    text_encoder = component("text_encoder", dtype).eval().requires_grad_(False)
    denoiser = component(cls.denoiser_folder, denoiser_dtype)
    denoiser_2, boundary = None, None
    if index.get("transformer_2", [None])[0] is not None:  # Wan 2.2 A14B: the low-noise expert
        denoiser_2 = component("transformer_2", denoiser_dtype)
    scheduler = component("scheduler")
    if denoiser_2 is not None and index.get("boundary_ratio") is not None:  # as WanPipeline switches experts
        boundary = index["boundary_ratio"] * scheduler.config.num_train_timesteps
    vae = None
    if index.get("vae", [None])[0] is not None:
        vae = component("vae", dtype).eval().requires_grad_(False)
    name = type(scheduler).__name__
    prediction = "flow" if ("FlowMatch" in name or scheduler.config.get("use_flow_sigmas")) else \
        ("v" if scheduler.config.get("prediction_type") == "v_prediction" else "eps")
    second = {}
    if index.get("text_encoder_2", [None])[0] is not None:  # HunyuanVideo 1.5: the ByT5 glyph encoder
        second = dict(tokenizer_2=component("tokenizer_2"),
                      text_encoder_2=component("text_encoder_2", dtype).eval().requires_grad_(False))
    model = cls(path, prediction, tokenizer, text_encoder, denoiser, vae, scheduler, cls.max_length(index, tokenizer),
                expand_timesteps=bool(index.get("expand_timesteps", False)), denoiser_2=denoiser_2, boundary=boundary,
                **second)
    if context_mesh is not None:
        model.enable_context_parallel(context_mesh)
    return model


# ----------------------------------------------------------------------------------------------
# The model card (the final LoRA's README.md)
# ----------------------------------------------------------------------------------------------
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
    evals = [r for r in common.read_jsonl(os.path.join(out, "metrics.jsonl")) if r.get("eval")]
    before, after = evals[0], evals[-1]
    lora = os.path.join(common.latest_checkpoint(out), "lora")
    hub = hub_id(cfg)
    base = hub or cfg.get("model_path") or MODEL_ALIASES.get(cfg["model"], cfg["model"])
    family = FAMILIES[cfg["family"]]
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
             f"| base model | `{base}` ({family.pipeline}"
             f"{'' if hub else '; a local folder, not on the Hugging Face Hub'}) |",
             f"| reward / judge | `{cfg.get('reward_name') or cfg.get('judge_name')}` |",
             f"| command | `{cfg.get('command') or '(main() called from Python; every argument is in config.json)'}` |"]
    lines += [f"| resumed with | `{c}` |" for c in cfg.get("resumed_with", [])]
    lines += [f"| optimisation steps | {after['step']} |", f"| training videos sampled | {samples_seen} |",
              f"| seed | {cfg['seed']} |",
              f"| LoRA rank / alpha | {cfg['lora_rank']} / {cfg['lora_alpha'] or cfg['lora_rank']} |",
              f"| ranks (GPUs) | {cfg.get('world_size', 1)} |", "",
              f"Held-out evaluation (`{cfg.get('eval_prompts')}`{counted}), before training and after:", "",
              f"| figure | step {before['step']} | step {after['step']} |", "|---|---|---|"]
    lines += [f"| {k} | {before.get(k, '')} | {after[k]} |" for k in figures]
    lines += ["", "```python", "import diffusers", "import torch", ""] + family.card_snippet(base)
    if two_experts:  # Wan 2.2 A14B: the low-noise expert's adapter is its own folder
        lines += ["pipe.load_lora_weights(\"path/to/lora_transformer_2\", load_into_transformer_2=True)"]
    lines += ["```", ""]
    if cfg["family"] == "toy":
        lines += ["The toy model samples in pixel space, which the stock pipeline does not: it loads the model and the "
                  "LoRA as above, and CleanVideoAlign samples them (`models.load_model`, `common.sample`).", ""]
    with open(os.path.join(lora, "README.md"), "w") as f:
        f.write("\n".join(lines))
    return os.path.join(lora, "README.md")
