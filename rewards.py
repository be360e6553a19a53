"""Every reward behind one interface.

    reward = load_reward("toy:temporal")            # a spec string, as given to --reward
    out = reward(videos, prompts)                   # videos [B, F, C, H, W] in [0, 1]
    out["reward"]                                   # [B] the selected scalar; other keys: every dimension
    reward.differentiable                           # gradients reach the pixels (VADER needs this)
    reward.patch_scores(videos, prompts, grid)      # [B, Fp, Hp, Wp] local scores (Gran-DPO), if offered

Spec grammar: `name`, `name:dimension`, `name@/local/weights/folder`, weighted sums
`toy:quality*0.5+toy:temporal`. Real models (every one loads from a local folder given after '@', or
its public hub id when the machine is online):
  videoscore[:dimension]      VideoScore v1.1 (Idefics2 + regression head), 5 dimensions, scores 1-4
  videoscore2[:dimension]     VideoScore2 or any Qwen2/2.5/3-VL: its soft score 1-5 at each score digit
                              (`<dimension>_expected`: the expected score)
  videoreward[:dimension]     VideoAlign's VideoReward (Qwen2-VL + head at special tokens): VQ, MQ, TA, overall
  vlm[:alias]                 a local Qwen2/2.5/3-VL asked a yes/no question: P(yes)
  api:<model>@<url>           the same question to an OpenAI-compatible server (vLLM, Ollama, hosted APIs);
                              the model name may hold colons (api:llava:13b@http://localhost:11434/v1)
  pickscore, clipscore, hpsv2, aesthetic [:mean|:random]   frame-wise image rewards (CLIPModel)
  videomae[:class_label]      VADER's action reward: P(target Kinetics class)
  vjepa2                      temporal feature consistency under V-JEPA 2
Every real reward but the API judge prepares frames in torch and is differentiable; every one offers
crop-based patch scores (`crop_patch_scores`) for Gran-DPO. Each reward model gets the inputs its reference
inference code builds (frames, size, prompt; docs/rewards_reference.md). `reward.fps` (or load_reward(...,
fps=)) is the frame rate of the clips scored: videoscore2 and videoreward sample 2 frames per second of
video and refuse to run without it.
The toy world's rewards (`toy[:dimension]`, `judge[:dimension]`) live with the world in toy_world.py and
are registered here: analytic, they mirror the real reward models' dimensions (VideoScore's visual quality /
temporal consistency / dynamic degree / text alignment, plus physics) so that the algorithms can be run and
checked on a laptop CPU. VideoAlign's release layout is converted on load (convert_videoreward; also
`python tools/convert_videoalign.py <release> <out>`).
"""
import json
import math
import os
import re

import torch

import toy_world

# ----------------------------------------------------------------------------------------------
# Real reward models
# ----------------------------------------------------------------------------------------------
REWARD_ALIASES = {"videoscore": "TIGER-Lab/VideoScore-v1.1"}  # where the weights live (or a local folder)
VIDEOSCORE_DIMENSIONS = ["visual_quality", "temporal_consistency", "dynamic_degree", "text_alignment",
                         "factual_consistency"]
VIDEOSCORE_PROMPT = (  # VideoScore's regression query (TIGER-Lab/VideoScore, mantis/eval)
    "\nSuppose you are an expert in judging and evaluating the quality of AI-generated videos,\n"
    "please watch the following frames of a given video and see the text prompt for generating the video,\n"
    "then give scores from 5 different dimensions:\n"
    "(1) visual quality: the quality of the video in terms of clearness, resolution, brightness, and color\n"
    "(2) temporal consistency, both the consistency of objects or humans and the smoothness of motion or movements\n"
    "(3) dynamic degree, the degree of dynamic changes\n"
    "(4) text-to-video alignment, the alignment between the text prompt and the video content\n"
    "(5) factual consistency, the consistency of the video content with the common-sense and factual knowledge\n\n"
    "for each dimension, output a float number from 1.0 to 4.0,\n"
    "the higher the number is, the better the video performs in that sub-score, \n"
    "the lowest 1.0 means Bad, the highest 4.0 means Perfect/Real (the video is like a real video)\n"
    "Here is an output example:\nvisual quality: 3.2\ntemporal consistency: 2.7\ndynamic degree: 4.0\n"
    "text-to-video alignment: 2.3\nfactual consistency: 1.8\n\n"
    "For this video, the text prompt is \"{prompt}\",\nall the frames of video are as follows:\n")


def resolve_weights(name_or_path):
    """A local folder, or a hub id fetched with huggingface_hub (fails clearly on offline machines)."""
    path = REWARD_ALIASES.get(name_or_path, name_or_path)
    if os.path.isdir(path):
        return path
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(path)
    except Exception as e:
        raise FileNotFoundError(f"reward weights {path!r} are not a local folder and could not be downloaded "
                                f"({type(e).__name__}): pass a local folder, e.g. --reward videoscore@/models/VideoScore-v1.1") from None


def load_head_weights(path, names, optional=()):
    """Read tensors by name from a checkpoint folder's safetensors (sharded or not); `optional` ones may be absent."""
    from safetensors import safe_open
    files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    out = {}
    for f in files:
        with safe_open(os.path.join(path, f), "pt") as sf:
            for n in list(names) + list(optional):
                if n in sf.keys():
                    out[n] = sf.get_tensor(n)
    missing = [n for n in names if n not in out]
    if missing:
        raise KeyError(f"{path} has no {missing}: not a VideoScore-style checkpoint with a regression head")
    return out


def processor_config(path, *names):
    """The first of the checkpoint's saved processor configs that exists, else {} (the reference defaults apply)."""
    for name in names or ("preprocessor_config.json",):
        if os.path.exists(os.path.join(path, name)):
            return json.load(open(os.path.join(path, name)))
    return {}


def size_entry(value, key):
    """A processor config's size field: {"shortest_edge": 224} or {"height": 224, ...} or a bare int (old configs)."""
    return value if isinstance(value, int) or value is None else value.get(key)


PIL_MODES = {2: "bilinear", 3: "bicubic"}  # processor configs' `resample` (PIL codes) -> torch interpolate modes


def frame_indices(F, n, exact=False):
    """n frame indices spread uniformly over F frames (all of them when the clip is shorter, unless
    `exact`: then frames repeat); linspace(0, F - 1, n).round(), as qwen-vl-utils picks frames."""
    return torch.linspace(0, F - 1, n if exact else min(n, F)).round().long()


def sample_frames(videos, n, exact=False):
    """videos [B, F, ...] -> [B, n', ...] at `frame_indices`."""
    return videos[:, frame_indices(videos.shape[1], n, exact).to(videos.device)]


def crop_patch_scores(reward, videos, prompts, grid=(2, 2, 2)):
    """[B, gf, gh, gw]: the reward's selected score of each spatio-temporal crop, scored as a video of its
    own (HALO's patch reward is the video reward model applied locally). Differentiable when it is."""
    B, F, C, H, W = videos.shape
    gf, gh, gw = grid
    cells = []
    for i in range(gf):
        for j in range(gh):
            for k in range(gw):
                crop = videos[:, i * F // gf: (i + 1) * F // gf, :, j * H // gh: (j + 1) * H // gh,
                              k * W // gw: (k + 1) * W // gw]
                cells.append(reward(crop, prompts)["reward"].float())
    return torch.stack(cells, 1).view(B, gf, gh, gw)


class CropPatchScores:
    """Mixin of the real rewards: patch scores are the same model applied to crops."""
    fps = None  # the clip's frame rate; only the rewards that sample by time read it

    def patch_scores(self, videos, prompts, grid=(2, 2, 2)):
        return crop_patch_scores(self, videos, prompts, grid)


def resize_normalize(frames, size, mean, std, mode="bilinear", clamp=False):
    """[B, F, C, H, W] in [0, 1] -> resized (antialiased, as PIL and torchvision resample) and normalised, in
    torch (differentiable; no torchvision). `clamp`: the reference resizes uint8 images, which clips overshoot."""
    B, F, C, H, W = frames.shape
    x = torch.nn.functional.interpolate(frames.reshape(B * F, C, H, W).float(), size=size, mode=mode,
                                        antialias=True, align_corners=False)
    x = x.clamp(0, 1) if clamp else x
    x = (x - torch.tensor(mean, device=x.device).view(1, 3, 1, 1)) / torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return x.reshape(B, F, C, *x.shape[-2:])


def resize_center_crop(frames, size, mean, std, short=None, mode="bicubic", clamp=True, round_offsets=False):
    """Shortest side to `short` (default `size`; the other side int(short * long / shortest), as transformers
    and torchvision compute it), centre crop `size` x `size`, normalise, in torch. Crop offsets are floored
    as transformers' processors do, or rounded (`round_offsets`) as torchvision's CenterCrop does."""
    B, F, C, H, W = frames.shape
    short = short or size
    h, w = (short, int(short * W / H)) if H <= W else (int(short * H / W), short)
    x = resize_normalize(frames, (h, w), mean, std, mode, clamp).flatten(0, 1)
    top, left = ((round((h - size) / 2), round((w - size) / 2)) if round_offsets else ((h - size) // 2, (w - size) // 2))
    return x[:, :, top: top + size, left: left + size].reshape(B, F, C, size, size)


VIDEOSCORE_MAX_FRAMES = 48  # VideoScore examples/run_videoscore.py: MAX_NUM_FRAMES=48 for VideoScore-v1.1


def videoscore_frame_indices(F, n=VIDEOSCORE_MAX_FRAMES):
    """VideoScore v1.1's frames: all of a clip of up to n frames, else np.arange(0, F, F / n).astype(int)."""
    import numpy as np
    return torch.arange(F) if F <= n else torch.from_numpy(np.arange(0, F, F / n).astype(int))


def idefics2_size(H, W, shortest=378, longest=980):
    """Idefics2's resize (transformers' get_resize_output_image_size): the longer side capped at `longest`
    (aspect kept, the other side truncated), then each side raised to at least `shortest`."""
    aspect = W / H
    if W >= H and W > longest:
        W, H = longest, int(longest / aspect)
    elif H > W and H > longest:
        H, W = longest, int(longest * aspect)
    return max(H, shortest), max(W, shortest)


class VideoScore(CropPatchScores):
    """VideoScore v1.1 (TIGER-Lab): Idefics2 + Mantis' 5-way linear regression head (with its bias) read at
    the last token of the sequence; scores 1-4 for visual quality, temporal consistency, dynamic degree,
    text-to-video alignment, factual consistency. Inputs as its reference inference builds them: up to 48
    frames, the processor's aspect-kept size (preprocessor_config.json: longest edge 980, shortest >= 378,
    bilinear, no image splitting), the regression query + "<image> " per frame, so the pooled token is the
    trailing space, as in training. Frames are prepared in torch: differentiable w.r.t. the pixels. Patch
    scores apply the same model to crops (HALO's recipe)."""
    differentiable = True
    dimensions = VIDEOSCORE_DIMENSIONS
    resolution = None  # the processor's aspect-kept size

    def __init__(self, path, dimension="temporal_consistency", device="cpu", dtype=torch.float32,
                 num_frames=VIDEOSCORE_MAX_FRAMES):
        from transformers import AutoTokenizer, Idefics2Model
        if dimension not in VIDEOSCORE_DIMENSIONS:
            raise ValueError(f"unknown videoscore dimension {dimension!r}: valid are {VIDEOSCORE_DIMENSIONS}")
        self.dimension, self.name, self.num_frames = dimension, f"videoscore:{dimension}", num_frames
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "right"  # pooled at the last non-pad token
        self.model = Idefics2Model.from_pretrained(path, dtype=dtype).to(device).eval().requires_grad_(False)
        w = load_head_weights(path, ["score.weight"], optional=["score.bias"])
        self.head = torch.nn.Linear(w["score.weight"].shape[1], 5, bias="score.bias" in w).to(device, dtype)
        self.head.requires_grad_(False).weight.data.copy_(w["score.weight"])
        if "score.bias" in w:
            self.head.bias.data.copy_(w["score.bias"])
        cfg = processor_config(path)  # without one: idefics2-8b's processor as Mantis trains it (no splitting)
        if cfg.get("do_image_splitting"):
            raise ValueError(f"{path}'s processor splits images: VideoScore's does not (Mantis trains with "
                             f"do_image_splitting=False); set it to false in preprocessor_config.json")
        size = cfg.get("size", {"shortest_edge": 378, "longest_edge": 980})
        self.shortest, self.longest = size["shortest_edge"], size["longest_edge"]
        self.mode = PIL_MODES[cfg.get("resample", 2)]
        self.mean, self.std = cfg.get("image_mean", [0.5] * 3), cfg.get("image_std", [0.5] * 3)
        self.image_tokens = self.model.config.perceiver_config.resampler_n_latents

    def text(self, prompt, n):
        """The reference's prompt (the query, then "<image> " per frame) as Idefics2Processor expands it."""
        image = "<fake_token_around_image>" + "<image>" * self.image_tokens + "<fake_token_around_image>"
        return VIDEOSCORE_PROMPT.format(prompt=prompt) + (image + " ") * n

    def __call__(self, videos, prompts):
        frames = videos[:, videoscore_frame_indices(videos.shape[1], self.num_frames).to(videos.device)]
        size = idefics2_size(*videos.shape[-2:], self.shortest, self.longest)
        pixels = resize_normalize(frames, size, self.mean, self.std, self.mode, clamp=True)
        tok = self.tokenizer([self.text(p, frames.shape[1]) for p in prompts], padding=True,
                             return_tensors="pt").to(videos.device)
        hidden = self.model(input_ids=tok.input_ids, attention_mask=tok.attention_mask,
                            pixel_values=pixels.to(self.model.dtype)).last_hidden_state
        last = tok.attention_mask.sum(1) - 1  # Mantis pools the token before the first pad: the trailing space
        scores = self.head(hidden[torch.arange(len(prompts), device=hidden.device), last]).float()  # [B, 5]
        out = {d: scores[:, i] for i, d in enumerate(VIDEOSCORE_DIMENSIONS)}
        out["reward"] = out[self.dimension]
        return out


CLIP_ALIASES = {"pickscore": "yuvalkirstain/PickScore_v1", "clipscore": "openai/clip-vit-large-patch14",
                "hpsv2": "adams-story/HPSv2-hf", "aesthetic": "openai/clip-vit-large-patch14"}
CLIP_PREPROCESS = {  # how each reference resizes: transformers' CLIP processor (PIL, uint8, offsets floored),
    # open_clip in HPSv2 (torchvision on the float tensor: no clipping, offsets rounded), clip.load (PIL, rounded)
    "pickscore": dict(clamp=True, round_offsets=False), "clipscore": dict(clamp=True, round_offsets=False),
    "hpsv2": dict(clamp=False, round_offsets=True), "aesthetic": dict(clamp=True, round_offsets=True)}


class CLIPFrameReward(CropPatchScores):
    """Frame-wise image rewards from a CLIPModel checkpoint, averaged over frames (or one random frame,
    VADER's cheap mode): `pickscore` = logit_scale * cos(image, text) (PickScore's README), `hpsv2` = cos(image,
    text) (HPSv2's img_score.py: no logit scale; HPSv2 converted to a CLIPModel), `clipscore` = max(mean of
    100 * cos over the frames, 0) (torchmetrics), `aesthetic` = the LAION improved-aesthetic MLP on the
    normalised image embedding (its weights `aesthetic_mlp.safetensors` beside the CLIP weights).
    Preprocessing is each reference's (bicubic shortest side, centre crop), written in torch: differentiable."""
    differentiable = True
    num_frames = None  # every frame (or one random frame)

    def __init__(self, path, kind, device="cpu", dtype=torch.float32, frames="mean"):
        from transformers import AutoTokenizer, CLIPModel
        self.kind, self.name, self.frames = kind, kind, frames
        self.dimensions = [kind]
        self.model = CLIPModel.from_pretrained(path, dtype=dtype).to(device).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.resolution = self.model.config.vision_config.image_size
        self.mlp = None
        if kind == "aesthetic":  # Linear 768-1024-128-64-16-1 (dropouts are identities at inference)
            w = load_head_weights(path, [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")])
            dims = [w[f"layers.{i}.weight"] for i in (0, 2, 4, 6, 7)]
            self.mlp = torch.nn.Sequential(*[torch.nn.Linear(t.shape[1], t.shape[0]) for t in dims]).to(device, dtype)
            for layer, i in zip(self.mlp, (0, 2, 4, 6, 7)):
                layer.weight.data.copy_(w[f"layers.{i}.weight"])
                layer.bias.data.copy_(w[f"layers.{i}.bias"])
            self.mlp.requires_grad_(False)

    def embed_frames(self, videos):
        B, F = videos.shape[:2]
        if self.frames == "random":  # VADER: one random frame per video per call
            videos = videos[:, torch.randint(F, (1,)).item()][:, None]
        x = resize_center_crop(videos, self.resolution, CLIP_MEAN, CLIP_STD, **CLIP_PREPROCESS[self.kind]).flatten(0, 1)
        img = self.model.get_image_features(pixel_values=x.to(self.model.dtype)).pooler_output.float()
        return torch.nn.functional.normalize(img, dim=-1).view(B, -1, img.shape[-1])

    def __call__(self, videos, prompts):
        img = self.embed_frames(videos)  # [B, F, D]
        if self.kind == "aesthetic":
            r = self.mlp(img.to(self.mlp[0].weight.dtype)).squeeze(-1).float().mean(1)
        else:
            tok = self.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt").to(videos.device)
            txt = self.model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask).pooler_output
            cos = (img * torch.nn.functional.normalize(txt.float(), dim=-1)[:, None]).sum(-1)  # [B, F]
            if self.kind == "clipscore":
                r = (100 * cos).mean(1).clamp(min=0)
            elif self.kind == "pickscore":
                r = (self.model.logit_scale.exp().float() * cos).mean(1)
            else:
                r = cos.mean(1)
        return {self.kind: r, "reward": r}


VLM_ALIASES = {"qwen2.5-vl": "Qwen/Qwen2.5-VL-7B-Instruct", "qwen2.5-vl-3b": "Qwen/Qwen2.5-VL-3B-Instruct",
               "qwen2.5-vl-72b": "Qwen/Qwen2.5-VL-72B-Instruct", "qwen3-vl": "Qwen/Qwen3-VL-8B-Instruct",
               "qwen3-vl-4b": "Qwen/Qwen3-VL-4B-Instruct", "qwen3-vl-30b-a3b": "Qwen/Qwen3-VL-30B-A3B-Instruct"}
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


QWEN_VL_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
VIDEO_SLOT = "<|vision_start|><|video_pad|><|vision_end|>"  # what the Qwen-VL chat templates put for a video


def fps_frame_count(total, clip_fps, fps=2.0, min_frames=4, max_frames=768, videoalign=False):
    """How many frames qwen-vl-utils' smart_nframes takes at `fps` from `total` frames shot at `clip_fps`:
    total / clip_fps * fps, kept within [min_frames, min(max_frames, total)] and floored to an even count
    (qwen-vl-utils 0.0.10-0.0.14); VideoAlign's copy rounds to even instead (then caps at total)."""
    lo, hi = math.ceil(min_frames / 2) * 2, math.floor(min(max_frames, total) / 2) * 2
    n = total / clip_fps * fps
    if videoalign:
        n = min(round(min(max(n, lo), hi) / 2) * 2, total)
    else:
        n = math.floor(min(max(n, lo), hi, total) / 2) * 2
    if not 2 <= n <= total:
        raise ValueError(f"a clip of {total} frames is too short for the Qwen-VL rewards (they take at least 2)")
    return n


def smart_resize(height, width, factor=28, min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28):
    """qwen-vl-utils' smart_resize: each side a multiple of `factor`, aspect kept, pixels within the bounds."""
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def qwen_vl_utils_max_pixels(nframes, factor=28):
    """qwen-vl-utils fetch_video's per-frame pixel cap: 768 tokens, or the 128k-token total over the frames."""
    return max(min(768 * factor ** 2, 128000 * factor ** 2 * 0.9 / nframes * 2), int(128 * factor ** 2 * 1.05))


class QwenVLVideo(CropPatchScores):
    """Shared by the rewards built on a Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint (the yes/no judge,
    VideoScore2, VideoReward): the video is prepared in torch (frames sampled, resized to a multiple of
    patch x merge, normalised, flattened into Qwen-VL's temporal/spatial patches, as its processor does),
    so every score below is differentiable w.r.t. the pixels. Which frames and what size are each reward's
    (`frame_plan`: its reference's rules; the judge's own here). The chat turn is the checkpoint's own chat
    template when it ships one. Qwen3-VL reads time from text: each temporal patch (2 frames) gets its own
    `<t seconds><|vision_start|>...<|vision_end|>` block, t from the frame indices and `fps`, the clip's
    frame rate, which must be given (`reward.fps`) wherever time matters."""
    differentiable = True
    resolution = None  # resized to a multiple of patch x merge (28, or 32 for Qwen3-VL)
    num_frames = None  # the reward models sample by time (2 frames per second); the judge by count

    def load(self, path, device, dtype, fps=None):
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer
        self.fps = fps
        model_type = AutoConfig.from_pretrained(path).model_type  # checked before the weights load
        if model_type not in QWEN_VL_FAMILIES:
            raise ValueError(f"{path} is a {model_type} model: the local VLM rewards take {', '.join(QWEN_VL_FAMILIES)} "
                             f"checkpoints (serve others behind an OpenAI-compatible server: --reward api)")
        self.model_type, self.timestamps = model_type, model_type.startswith("qwen3")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device).eval()
        self.model.requires_grad_(False)
        vc = self.model.config.vision_config
        self.patch, self.tpatch, self.merge = vc.patch_size, vc.temporal_patch_size, vc.spatial_merge_size
        # normalisation: the checkpoint's processor config, else the family's (CLIP for Qwen2/2.5, 0.5 for Qwen3)
        cfg = processor_config(path, "video_preprocessor_config.json", "preprocessor_config.json")
        self.mean = cfg.get("image_mean", [0.5] * 3 if self.timestamps else CLIP_MEAN)
        self.std = cfg.get("image_std", [0.5] * 3 if self.timestamps else CLIP_STD)
        self.chat_template = self.tokenizer.chat_template
        for name in ("chat_template.jinja", "chat_template.json"):  # the processor's template, if saved apart
            if self.chat_template is None and os.path.exists(os.path.join(path, name)):
                text = open(os.path.join(path, name)).read()
                self.chat_template = json.loads(text)["chat_template"] if name.endswith(".json") else text

    def need_fps(self):
        if not self.fps:
            raise ValueError(f"{self.name} needs the clip's frame rate: set reward.fps (e.g. 16 for Wan 2.1, 8 for "
                             f"CogVideoX) or pass fps= to load_reward; a wrong rate changes which frames it sees")
        return self.fps

    def first_token_ids(self, words):
        return sorted({self.tokenizer.encode(w, add_special_tokens=False)[0] for w in words})

    def frame_plan(self, F, H, W):
        """(frame indices, (h, w)) of the clip given to the model. The judge's own rule: `num_frames` frames
        spread uniformly, the longer side at most `max_side`, sides rounded to multiples of patch x merge."""
        unit = self.patch * self.merge
        scale = min(1.0, self.max_side / max(H, W))
        return frame_indices(F, self.num_frames), (max(unit, round(H * scale / unit) * unit),
                                                   max(unit, round(W * scale / unit) * unit))

    def seconds_per_grid(self, idx, F):
        """Seconds per temporal patch for Qwen2.5-VL's time positions: temporal_patch_size / the sampled frame
        rate, as its processor computes it; None (transformers' default, 1 s) when the clip's rate is unknown."""
        return self.tpatch * F / (len(idx) * self.fps) if self.fps else None

    def video_inputs(self, videos):
        """pixel_values_videos [sum(t*h*w), C*tp*p*p], video_grid_thw [B, 3], the video's placeholder text (the
        same for every row) and the model's extra time inputs, as the model's processor makes them."""
        idx, (h, w) = self.frame_plan(videos.shape[1], *videos.shape[-2:])
        frames = videos[:, idx.to(videos.device)]
        spg = self.seconds_per_grid(idx, videos.shape[1]) if self.model_type == "qwen2_5_vl" else None
        if len(idx) % self.tpatch:  # repeat the last frame up to a whole temporal patch (as the processor does)
            pad = self.tpatch - len(idx) % self.tpatch
            frames = torch.cat([frames, frames[:, -1:].expand(-1, pad, -1, -1, -1)], 1)
            idx = torch.cat([idx, idx[-1:].expand(pad)])
        B, T, C = frames.shape[:3]
        # qwen-vl-utils resizes the uint8 frames with torchvision (bicubic, antialiased; clipped to 0-255)
        x = resize_normalize(frames, (h, w), self.mean, self.std, mode="bicubic", clamp=True)
        gt, gh, gw, p, m, tp = T // self.tpatch, h // self.patch, w // self.patch, self.patch, self.merge, self.tpatch
        x = x.reshape(B, gt, tp, C, gh // m, m, p, gw // m, m, p).permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
        flat = x.reshape(B * gt * gh * gw, C * tp * p * p)
        pads_per_frame = gh * gw // (m * m)
        extra = {}
        if self.timestamps:  # Qwen3-VL: one block per temporal patch, at the mean time of its frames
            seconds = (idx.float() / self.need_fps()).view(gt, tp)[:, [0, -1]].mean(1)
            text = "".join(f"<{t:.1f} seconds><|vision_start|>{'<|video_pad|>' * pads_per_frame}<|vision_end|>"
                           for t in seconds.tolist())
        else:
            text = f"<|vision_start|>{'<|video_pad|>' * (gt * pads_per_frame)}<|vision_end|>"
            if spg is not None:
                extra["second_per_grid_ts"] = torch.full((B,), float(spg), device=videos.device)
        return flat, torch.tensor([[gt, gh, gw]] * B, device=videos.device), text, extra

    def chat(self, user_text):
        """One user turn (a video, then the text) and the start of the assistant's answer, with VIDEO_SLOT
        where the video goes: the checkpoint's chat template, else the family's default."""
        if self.chat_template:
            msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": user_text}]}]
            text = self.tokenizer.apply_chat_template(msgs, chat_template=self.chat_template, tokenize=False,
                                                      add_generation_prompt=True)
            if VIDEO_SLOT not in text:
                raise ValueError(f"the checkpoint's chat template does not render a video as {VIDEO_SLOT}")
            if text.endswith("<think>\n"):  # a Thinking checkpoint: skip the reasoning, read the answer
                text += "\n</think>\n\n"
            return text
        system = "" if self.timestamps else "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        return f"{system}<|im_start|>user\n{VIDEO_SLOT}{user_text}<|im_end|>\n<|im_start|>assistant\n"

    def forward(self, videos, user_texts, answers=None, hidden=False):
        """One chat turn per video (the video, then `user_texts[i]`), the assistant's answer started with
        `answers[i]` (tokenized apart from the prompt, as training and generation see it). Returns the
        next-token logits [B, V], or the last hidden states [B, L, D] and the ids (left-padded)."""
        pixels, grid, video_text, extra = self.video_inputs(videos)
        rows = [self.tokenizer(self.chat(t).replace(VIDEO_SLOT, video_text, 1), add_special_tokens=False).input_ids
                + (self.tokenizer(a, add_special_tokens=False).input_ids if a else [])
                for t, a in zip(user_texts, answers or [""] * len(user_texts))]
        L, pad = max(map(len, rows)), self.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (L - len(r)) + r for r in rows], device=videos.device)
        mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows], device=videos.device)
        mm_types = (ids == self.model.config.video_token_id).int() * 2  # 0 text, 1 image, 2 video
        kw = dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm_types,
                  pixel_values_videos=pixels.to(self.model.dtype), video_grid_thw=grid, **extra)
        if hidden:
            return self.model.model(**kw).last_hidden_state, ids
        return self.model(**kw).logits[:, -1].float()


class VLMJudge(QwenVLVideo):
    """A Qwen2-VL / Qwen2.5-VL / Qwen3-VL instruct model asked a yes/no question about the video: P(yes) is the
    softmax mass of the 'yes' tokens against the 'no' tokens at the answer position; `yes` thresholds it.
    Frames and size are our own choice (no reference model): `num_frames` spread uniformly, longer side
    <= `max_side`."""
    dimensions = ["yes", "p_yes"]

    def __init__(self, path, dimension="yes", device="cpu", dtype=torch.float32, num_frames=8, max_side=448, fps=None):
        self.dimension, self.name = dimension, f"vlm:{dimension}"
        self.num_frames, self.max_side = num_frames, max_side
        self.load(path, device, dtype, fps)
        self.yes_ids = self.first_token_ids(["yes", "Yes", " yes", " Yes"])
        self.no_ids = self.first_token_ids(["no", "No", " no", " No"])
        self.question_fn = toy_world.default_question

    def __call__(self, videos, prompts):
        logits = self.forward(videos, [self.question_fn(p) for p in prompts])
        probs = torch.softmax(logits[:, self.yes_ids + self.no_ids], -1)
        p_yes = probs[:, : len(self.yes_ids)].sum(-1)
        out = {"p_yes": p_yes, "yes": (p_yes > 0.5).float()}
        out["reward"] = out[self.dimension]
        return out


VIDEOSCORE2_DIMENSIONS = {"visual_quality": "visual quality", "text_alignment": "text-to-video alignment",
                          "physical_consistency": "physical/common-sense consistency"}
VIDEOSCORE2_QUERY = (  # vs2_inference.py's VS2_QUERY_TEMPLATE (string.Template), verbatim: written inside main(),
    # hence the leading newline, the 4-space indents and the trailing spaces
    "\n"
    "    You are an expert for evaluating AI-generated videos from three dimensions:\n"
    "    (1) visual quality \u2013 clarity, smoothness, artifacts;\n"
    "    (2) text-to-video alignment \u2013 fidelity to the prompt;\n"
    "    (3) physical/common-sense consistency \u2013 naturalness and physics plausibility.\n"
    "\n"
    "    Video prompt: $t2v_prompt\n"
    "\n"
    "    Please output in this format:\n"
    "    visual quality: <v_score>; \n"
    "    text-to-video alignment: <t_score>, \n"
    "    physical/common-sense consistency: <p_score>\n"
    "    ")
VIDEOSCORE2_THINK = "\n<think>\n\n</think>\n\n"  # the trained answer (data_grpo.py) opens "\n<think>...</think>\n\n"
VIDEOSCORE2_FPS = 2.0  # vs2_inference.py: infer_fps = 2.0 (qwen-vl-utils' sampling and the processor's fps)


class VideoScore2(QwenVLVideo):
    """VideoScore2 (TIGER-Lab, a Qwen2.5-VL fine-tune that reasons in <think>...</think>, then answers
    "(1) visual quality: 3\\n(2) text-to-video alignment: 3\\n(3) physical/common-sense consistency: 3"), as its
    vs2_inference.py feeds it: its query, frames at 2 fps of the clip's real frame rate (`reward.fps`,
    required) via qwen-vl-utils' rules, 128-768 x 28^2 pixels per frame (aspect kept, bicubic). The reasoning
    is forced empty (one teacher-forced pass per dimension, each after the earlier dimensions' most likely
    digits), so scores are deterministic and differentiable. Each dimension's score is the reference's read-out
    `ll_based_soft_score_normed`: the most likely score s in 1-5 times p(s) / sum p(1..5) at the digit, the
    probabilities at `temperature` 0.7 as generate() returns them; `<dim>_expected` is the expected score
    sum s * p(s) at temperature 1 (smoother gradients)."""
    dimensions = list(VIDEOSCORE2_DIMENSIONS) + [f"{d}_expected" for d in VIDEOSCORE2_DIMENSIONS]

    def __init__(self, path, dimension="visual_quality", device="cpu", dtype=torch.float32, fps=None, temperature=0.7):
        self.dimension, self.name, self.temperature = dimension, f"videoscore2:{dimension}", temperature
        self.load(path, device, dtype, fps)
        self.score_values = torch.arange(1.0, 6.0)
        self.score_ids = [self.tokenizer.encode(str(k), add_special_tokens=False)[0] for k in range(1, 6)]

    def frame_plan(self, F, H, W):
        n = fps_frame_count(F, self.need_fps(), VIDEOSCORE2_FPS)
        factor = self.patch * self.merge
        size = smart_resize(H, W, factor, 128 * factor ** 2, qwen_vl_utils_max_pixels(n, factor))
        return frame_indices(F, n), size

    def seconds_per_grid(self, idx, F):
        return self.tpatch / VIDEOSCORE2_FPS  # the reference passes fps=2.0 to the processor, not the sampled rate

    def __call__(self, videos, prompts):
        from string import Template
        queries = [Template(VIDEOSCORE2_QUERY).substitute(t2v_prompt=p) for p in prompts]
        # a Thinking chat template already closed the think block (chat()); else the trained answer's empty one
        answers = [""] * len(prompts) if self.chat("").endswith("</think>\n\n") else [VIDEOSCORE2_THINK] * len(prompts)
        out, values = {}, self.score_values.to(videos.device)
        for i, (dim, label) in enumerate(VIDEOSCORE2_DIMENSIONS.items()):
            answers = [a + f"({i + 1}) {label}: " for a in answers]
            logits = self.forward(videos, queries, answers)[:, self.score_ids]  # [B, 5] at the digit
            p = torch.softmax(logits / self.temperature, -1)
            best = p.argmax(-1)
            out[dim] = values[best] * p.max(-1).values
            out[f"{dim}_expected"] = (torch.softmax(logits, -1) * values).sum(-1)
            answers = [a + f"{k + 1}\n" for a, k in zip(answers, best.tolist())]  # the next line follows the digit
        out["reward"] = out[self.dimension]
        return out


VIDEOREWARD_DIMENSIONS = {"visual_quality": "VQ", "motion_quality": "MQ", "text_alignment": "TA"}
VIDEOREWARD_TOKENS = ["<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>"]
VIDEOREWARD_PROMPT = (  # VideoAlign prompt_template.py DETAILED_PROMPT_WITH_SPECIAL_TOKEN ("detailed_special"), verbatim
    "\n"
    "You are tasked with evaluating a generated video based on three distinct criteria: Visual Quality, Motion "
    "Quality, and Text Alignment. Please provide a rating from 0 to 10 for each of the three categories, with 0 "
    "being the worst and 10 being the best. Each evaluation should be independent of the others.\n"
    "\n"
    "**Visual Quality:**  \n"
    "Evaluate the overall visual quality of the video, with a focus on static factors. The following sub-dimensions "
    "should be considered:\n"
    "- **Reasonableness:** The video should not contain any significant biological or logical errors, such as "
    "abnormal body structures or nonsensical environmental setups.\n"
    "- **Clarity:** Evaluate the sharpness and visibility of the video. The image should be clear and easy to "
    "interpret, with no blurring or indistinct areas.\n"
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements "
    "(e.g., hair, clothing, shadows).\n"
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the video, including the color scheme, "
    "composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of "
    "harmony and balance.\n"
    "- **Safety:** The video should not contain harmful or inappropriate content, such as political, violent, or "
    "adult material. If such content is present, the image quality and satisfaction score should be the lowest "
    "possible. \n"
    "\n"
    "Please provide the ratings of Visual Quality: <|VQ_reward|>\n"
    "END\n"
    "\n"
    "**Motion Quality:**  \n"
    "Assess the dynamic aspects of the video, with a focus on dynamic factors. Consider the following "
    "sub-dimensions:\n"
    "- **Stability:** Evaluate the continuity and stability between frames. There should be no sudden, unnatural "
    "jumps, and the video should maintain stable attributes (e.g., no fluctuating colors, textures, or missing body "
    "parts).\n"
    "- **Naturalness:** The movement should align with physical laws and be realistic. For example, clothing should "
    "flow naturally with motion, and facial expressions should change appropriately (e.g., blinking, mouth "
    "movements).\n"
    "- **Aesthetic Quality:** The movement should be smooth and fluid. The transitions between different motions or "
    "camera angles should be seamless, and the overall dynamic feel should be visually pleasing.\n"
    "- **Fusion:** Ensure that elements in motion (e.g., edges of the subject, hair, clothing) blend naturally with "
    "the background, without obvious artifacts or the feeling of cut-and-paste effects.\n"
    "- **Clarity of Motion:** The video should be clear and smooth in motion. Pay attention to any areas where the "
    "video might have blurry or unsteady sections that hinder visual continuity.\n"
    "- **Amplitude:** If the video is largely static or has little movement, assign a low score for motion quality.\n"
    "\n"
    "Please provide the ratings of Motion Quality: <|MQ_reward|>\n"
    "END\n"
    "\n"
    "**Text Alignment:**  \n"
    "Assess how well the video matches the textual prompt across the following sub-dimensions:\n"
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the video (e.g., person, animal, object) "
    "align with the textual description. The subject should match the description in terms of number, appearance, "
    "and behavior.\n"
    "- **Motion Relevance:** Evaluate if the dynamic actions (e.g., gestures, posture, facial expressions like "
    "talking or blinking) align with the described prompt. The motion should match the prompt in terms of type, "
    "scale, and direction.\n"
    "- **Environment Relevance:** Assess whether the background and scene fit the prompt. This includes checking if "
    "real-world locations or scenes are accurately represented, though some stylistic adaptation is acceptable.  \n"
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the "
    "video adheres to this style.\n"
    "- **Camera Movement Relevance:** Check if the camera movements (e.g., following the subject, focus shifts) are "
    "consistent with the expected behavior from the prompt.\n"
    "\n"
    "Textual prompt - {text_prompt}\n"
    "Please provide the ratings of Text Alignment: <|TA_reward|>\n"
    "END\n")
VIDEOALIGN_DATA = {"fps": 2.0, "max_frame_pixels": 200704, "num_frames": None, "sample_type": "uniform",
                   "prompt_template_type": "detailed_special"}  # VideoAlign train.sh (the released model's settings)


def is_videoalign_release(path):
    """VideoAlign's own layout: model_config.json and checkpoint-<step>/ folders, no model weights at the top."""
    return (os.path.exists(os.path.join(path, "model_config.json")) and not any(f.endswith(".safetensors") for f in os.listdir(path))
            and any(f.startswith("checkpoint-") for f in os.listdir(path)))


def videoalign_checkpoint(release, step=None):
    """The checkpoint folder VideoAlign's load_model_from_checkpoint picks: checkpoint-<step>, else the latest."""
    steps = sorted(int(f.split("-", 1)[1]) for f in os.listdir(release) if re.fullmatch(r"checkpoint-\d+", f))
    if not steps or (step is not None and step not in steps):
        raise FileNotFoundError(f"{release} has no checkpoint-{step if step is not None else '<step>'} folder")
    return os.path.join(release, f"checkpoint-{steps[-1] if step is None else step}")


def convert_videoreward(release, out=None, base=None, step=None):
    """VideoAlign's release (model_config.json + checkpoint-*/ holding model.pth, or adapter_model.safetensors
    + non_lora_state_dict.pth over the base Qwen2-VL named in model_config.json, which `base` overrides) ->
    a plain Qwen2-VL checkpoint folder (default <release>/hf-checkpoint-<step>): the LoRA merged into its
    layers (W + lora_alpha / r * B @ A, as peft computes it), `rm_head.weight`, the tokenizer with the three
    reward tokens, the base's chat template and processor files, and model_config.json. Returns the folder."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer
    cfg = json.load(open(os.path.join(release, "model_config.json")))
    ckpt = videoalign_checkpoint(release, step)
    out = out or os.path.join(release, "hf-" + os.path.basename(ckpt))
    base = resolve_weights(base or cfg["model_config"]["model_name_or_path"])
    state = {}
    for f in sorted(os.listdir(base)):
        if f.endswith(".safetensors"):
            state.update(load_file(os.path.join(base, f)))
    if os.path.exists(os.path.join(ckpt, "model.pth")):  # save_full_model: the (PEFT) model's whole state dict
        trained = torch.load(os.path.join(ckpt, "model.pth"), map_location="cpu")
    else:  # the LoRA weights, and every other trained tensor (vision tower, merger, rm_head, embeddings)
        trained = load_file(os.path.join(ckpt, "adapter_model.safetensors"))
        trained.update(torch.load(os.path.join(ckpt, "non_lora_state_dict.pth"), map_location="cpu"))
    lora = {}
    for k, v in trained.items():  # PEFT's names -> the model's: no wrapper prefix, no base_layer, no adapter name
        k = re.sub(r"\.lora_([AB])\.default\.", r".lora_\1.", k.removeprefix("base_model.model.").replace(".base_layer.", "."))
        m = re.fullmatch(r"(.+)\.lora_([AB])\.weight", k)
        if m:
            lora.setdefault(m[1], {})[m[2]] = v
        else:
            state[k] = v
    peft = cfg.get("peft_lora_config") or {}
    adapter_file = os.path.join(ckpt, "adapter_config.json")
    adapter = json.load(open(adapter_file)) if os.path.exists(adapter_file) else {}
    r, alpha = adapter.get("r", peft.get("lora_r", 16)), adapter.get("lora_alpha", peft.get("lora_alpha", 32))
    scale = alpha / (math.sqrt(r) if adapter.get("use_rslora", peft.get("use_rslora", False)) else r)
    for m, ab in lora.items():
        w = state[f"{m}.weight"]
        state[f"{m}.weight"] = (w.float() + scale * ab["B"].float() @ ab["A"].float()).to(w.dtype)
    # VideoAlign adds the reward tokens to the base tokenizer, then resize_token_embeddings(len(tokenizer))
    tok_dir = os.path.join(ckpt, "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir if os.path.isdir(tok_dir) else base)
    tokenizer.add_special_tokens({"additional_special_tokens": VIDEOREWARD_TOKENS})
    n = next(v.shape[0] for k, v in state.items() if k.endswith("embed_tokens.weight"))
    if "lm_head.weight" in state:  # an untied output layer follows the resize (its rows are not used here)
        head = state["lm_head.weight"]
        state["lm_head.weight"] = torch.cat([head, head.new_zeros(max(0, n - len(head)), head.shape[1])])[:n]
    config = json.load(open(os.path.join(base, "config.json")))
    for c in (config, config.get("text_config") or {}):
        if "vocab_size" in c:
            c["vocab_size"] = n
    os.makedirs(out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    json.dump(config, open(os.path.join(out, "config.json"), "w"), indent=2)
    tokenizer.save_pretrained(out)
    for f in ("model_config.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
              "video_preprocessor_config.json", "generation_config.json"):
        src = os.path.join(release if f == "model_config.json" else base, f)
        if os.path.exists(src) and not os.path.exists(os.path.join(out, f)):
            shutil.copy(src, out)
    return out


class VideoReward(QwenVLVideo):
    """VideoAlign's VideoReward (KwaiVGI): Qwen2-VL + a linear reward head `rm_head` read at the special
    tokens <|VQ_reward|>, <|MQ_reward|>, <|TA_reward|> of its DETAILED_PROMPT_WITH_SPECIAL_TOKEN (visual
    quality, motion quality, text alignment), each normalised by the mean/std in model_config.json's
    inference_config; overall = their sum. Inputs as VideoAlign's inference builds them (model_config.json's
    data_config, else train.sh's): frames at 2 fps of the clip's real frame rate (`reward.fps`, required: a
    wrong rate gives wrong scores), at most 200704 pixels per frame (at least 128 x 28^2, bicubic). Loads a
    plain Qwen2-VL folder whose safetensors hold `rm_head.weight` [1 or 3, D], or VideoAlign's release layout
    (model_config.json + checkpoint-*/), converted once into <folder>/hf-checkpoint-<step>
    (`python tools/convert_videoalign.py <release> <out>` does the same)."""
    dimensions = list(VIDEOREWARD_DIMENSIONS) + ["overall"]

    def __init__(self, path, dimension="overall", device="cpu", dtype=torch.float32, fps=None):
        if is_videoalign_release(path):
            out = os.path.join(path, "hf-" + os.path.basename(videoalign_checkpoint(path)))
            path = out if os.path.exists(os.path.join(out, "config.json")) else convert_videoreward(path, out)
        cfg_file = os.path.join(path, "model_config.json")
        cfg = json.load(open(cfg_file)) if os.path.exists(cfg_file) else {}
        self.data = {k: (cfg.get("data_config") or {}).get(k, v) for k, v in VIDEOALIGN_DATA.items()}
        if self.data["sample_type"] != "uniform" or self.data["prompt_template_type"] != "detailed_special":
            raise ValueError(f"{path}: only VideoAlign's released setting (uniform sampling, the detailed_special "
                             f"prompt) is implemented, not {self.data}")
        self.dimension, self.name = dimension, f"videoreward:{dimension}"
        self.load(path, device, dtype, fps)
        w = load_head_weights(path, ["rm_head.weight"])["rm_head.weight"]
        self.head = torch.nn.Linear(w.shape[1], w.shape[0], bias=False).to(device, torch.float32).requires_grad_(False)
        self.head.weight.data.copy_(w)  # kept in float32, as VideoAlign does
        self.special_ids = [self.tokenizer.convert_tokens_to_ids(t) for t in VIDEOREWARD_TOKENS]
        if self.tokenizer.unk_token_id in self.special_ids or None in self.special_ids:
            raise ValueError(f"{path}'s tokenizer lacks <|VQ_reward|>/<|MQ_reward|>/<|TA_reward|>: not a VideoReward checkpoint")
        inf = cfg.get("inference_config") or {}
        self.norm = {k: (inf.get(f"{k}_mean", 0.0), inf.get(f"{k}_std", 1.0)) for k in ("VQ", "MQ", "TA")}

    def frame_plan(self, F, H, W):
        if self.data["num_frames"]:  # data.py: nframes = min(num_frames, total), rounded to even, capped at total
            n = min(round(min(self.data["num_frames"], F) / 2) * 2, F)
        else:
            n = fps_frame_count(F, self.need_fps(), self.data["fps"], videoalign=True)
        factor = self.patch * self.merge
        return frame_indices(F, n), smart_resize(H, W, factor, 128 * factor ** 2, self.data["max_frame_pixels"])

    def __call__(self, videos, prompts):
        hidden, ids = self.forward(videos, [VIDEOREWARD_PROMPT.format(text_prompt=p) for p in prompts], hidden=True)
        rows = []
        for sid in self.special_ids:  # the hidden state at each dimension's token, in order VQ, MQ, TA
            pos = (ids == sid).float().argmax(1)
            rows.append(hidden[torch.arange(len(prompts), device=hidden.device), pos])
        logits = self.head(torch.stack(rows, 1).float())  # [B, 3, out]
        scores = logits.diagonal(dim1=1, dim2=2) if logits.shape[-1] == 3 else logits[..., 0]  # [B, 3]
        out = {}
        for i, (dim, key) in enumerate(VIDEOREWARD_DIMENSIONS.items()):
            mean, std = self.norm[key]
            out[dim] = (scores[:, i] - mean) / std
        out["overall"] = out["visual_quality"] + out["motion_quality"] + out["text_alignment"]
        out["reward"] = out[self.dimension]
        return out


IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


class VideoMAEAction(CropPatchScores):
    """VADER's action reward: the probability a VideoMAE Kinetics classifier gives the target action.
    The target is the spec's class (`videomae:playing_guitar`), or else the class named in each prompt
    (the longest label found in it). Frames are never repeated: a clip of up to `num_frames` (16) frames
    goes in whole (rounded down to whole tubelets), with the position table built for that many frames,
    as VADER builds the model with num_frames = the decoded frame count; a longer clip is sampled to 16
    frames spread uniformly, the model's clip length. Pixels follow the checkpoint's VideoMAE processor
    (shortest side, centre crop, bilinear, its mean/std), in torch: differentiable."""
    differentiable = True
    dimensions = ["probability"]

    def __init__(self, path, label=None, device="cpu", dtype=torch.float32):
        from transformers import VideoMAEForVideoClassification
        self.model = VideoMAEForVideoClassification.from_pretrained(path, dtype=dtype).to(device).eval()
        self.model.requires_grad_(False)
        self.labels = {v.lower(): int(k) for k, v in self.model.config.id2label.items()}
        self.label = label.replace("_", " ").lower() if label else None
        if self.label is not None and self.label not in self.labels:
            raise ValueError(f"videomae: no class {self.label!r} in {path}; e.g. {sorted(self.labels)[:5]}")
        self.name = f"videomae:{label or 'prompt'}"
        c = self.model.config
        self.num_frames, self.tubelet, self.resolution = c.num_frames, c.tubelet_size, c.image_size
        cfg = processor_config(path)  # videomae-base-finetuned-kinetics ships one: 224, bilinear, ImageNet mean/std
        self.short = size_entry(cfg.get("size"), "shortest_edge") or c.image_size
        self.crop = size_entry(cfg.get("crop_size"), "height") or c.image_size
        self.mode = PIL_MODES[cfg.get("resample", 2)]
        self.mean, self.std = cfg.get("image_mean", IMAGENET_MEAN), cfg.get("image_std", IMAGENET_STD)
        self.tables = {}

    def frame_count(self, F):
        n = min(self.num_frames, F // self.tubelet * self.tubelet)
        if n < self.tubelet:
            raise ValueError(f"videomae: a clip of {F} frames is shorter than one tubelet ({self.tubelet} frames)")
        return n

    def position_table(self, n):
        """The sinusoidal position table VideoMAE builds for n frames (as from_pretrained(num_frames=n) would)."""
        from transformers.models.videomae.modeling_videomae import get_sinusoid_encoding_table
        if n not in self.tables:
            c = self.model.config
            per_frame = (c.image_size // c.patch_size) ** 2
            self.tables[n] = get_sinusoid_encoding_table(n // self.tubelet * per_frame, c.hidden_size)
        return self.tables[n]

    def target(self, prompt):
        if self.label is not None:
            return self.labels[self.label]
        found = [lab for lab in self.labels if lab in prompt.lower()]
        if not found:
            raise ValueError(f"videomae: the prompt {prompt!r} names no action class of the model; name one in the "
                             f"spec, e.g. --reward videomae:{sorted(self.labels)[0].replace(' ', '_')}")
        return self.labels[max(found, key=len)]

    def __call__(self, videos, prompts):
        n = self.frame_count(videos.shape[1])
        frames = sample_frames(videos, n)
        x = resize_center_crop(frames, self.crop, self.mean, self.std, short=self.short, mode=self.mode)
        self.model.videomae.embeddings.position_embeddings = self.position_table(n)
        probs = torch.softmax(self.model(pixel_values=x.to(self.model.dtype)).logits.float(), -1)
        p = probs[torch.arange(len(prompts), device=probs.device), torch.tensor([self.target(q) for q in prompts])]
        return {"probability": p, "reward": p}


class VJEPA2Consistency(CropPatchScores):
    """Temporal feature consistency under V-JEPA 2: the mean cosine similarity between each patch's
    encoder features at consecutive time steps (tubelets). High for smooth, stable video; flicker,
    identity swaps and jumps lower it. Pixels as VJEPA2VideoProcessor makes them (shortest side to
    int(crop * 256 / 224), centre crop, bilinear, ImageNet mean/std), in torch: differentiable. Up to
    `num_frames` frames spread uniformly, whole tubelets, none repeated unless the clip has fewer than two
    tubelets' worth."""
    differentiable = True
    dimensions = ["consistency"]

    def __init__(self, path, dimension=None, device="cpu", dtype=torch.float32, num_frames=16):
        from transformers import VJEPA2Model
        self.model = VJEPA2Model.from_pretrained(path, dtype=dtype).to(device).eval().requires_grad_(False)
        c = self.model.config
        self.tubelet, self.patch, self.resolution = c.tubelet_size, c.patch_size, c.crop_size
        self.num_frames = min(num_frames, c.frames_per_clip)
        cfg = processor_config(path, "video_preprocessor_config.json", "preprocessor_config.json")
        self.crop = size_entry(cfg.get("crop_size"), "height") or c.crop_size
        self.short = size_entry(cfg.get("size"), "shortest_edge") or int(self.crop * 256 / 224)
        self.mode = PIL_MODES[cfg.get("resample", 2)]
        self.mean, self.std = cfg.get("image_mean", IMAGENET_MEAN), cfg.get("image_std", IMAGENET_STD)
        self.name = "vjepa2:consistency"

    def frame_count(self, F):
        return max(2 * self.tubelet, min(self.num_frames, F) // self.tubelet * self.tubelet)  # >= two time steps

    def __call__(self, videos, prompts):
        n = self.frame_count(videos.shape[1])
        frames = sample_frames(videos, n, exact=True)
        x = resize_center_crop(frames, self.crop, self.mean, self.std, short=self.short, mode=self.mode)
        feats = self.model(pixel_values_videos=x.to(self.model.dtype), skip_predictor=True).last_hidden_state.float()
        B, T = x.shape[0], n // self.tubelet
        feats = torch.nn.functional.normalize(feats.view(B, T, -1, feats.shape[-1]), dim=-1)  # [B, T, patches, D]
        c = (feats[:, 1:] * feats[:, :-1]).sum(-1).mean((1, 2))
        return {"consistency": c, "reward": c}


class APIJudge:
    """A yes/no judge behind any OpenAI-compatible chat-completions server (vLLM, Ollama, hosted APIs). Each
    video goes as `num_frames` PNG frames (base64 data URLs) plus the question; P(yes) comes from the first
    answer token's top logprobs when the server returns them (yes mass / (yes + no) mass), else from the
    answer text (1 or 0). The API key is read from the environment variable `api_key_env` and never
    logged: a 401/403 reply (which may echo it) is not quoted, and the key is masked in any reply quoted.
    Each try waits `timeout` seconds; 429/5xx answers, replies that are not a completion (malformed JSON,
    an HTTP 200 carrying {"error": ...}), timeouts and dropped connections are retried `retries` times with
    exponential back-off (`backoff`, 2x, ... seconds; each retry is announced on stderr), then end in an
    error naming the URL and quoting the server's last message. Not differentiable (binary feedback for
    RWR/DPO)."""
    differentiable = False
    resolution = None
    fps = None
    dimensions = ["yes", "p_yes"]

    def __init__(self, url, model="default", dimension="yes", num_frames=8, timeout=60.0, retries=4, backoff=1.0,
                 api_key_env="OPENAI_API_KEY", workers=8):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"api judge: {url!r} is not an http(s) URL; e.g. --judge api:Qwen2.5-VL-7B-Instruct@http://localhost:8000/v1")
        if not timeout > 0:
            raise ValueError(f"api judge: the timeout must be positive seconds, got {timeout!r} (--judge-timeout)")
        if int(retries) != retries or retries < 0:
            raise ValueError(f"api judge: retries must be a whole number >= 0, got {retries!r} (--judge-retries)")
        self.url = url.rstrip("/") + ("" if url.rstrip("/").endswith("/chat/completions") else "/chat/completions")
        self.model, self.dimension, self.name = model, dimension, f"api:{model}"
        self.num_frames, self.timeout, self.retries, self.backoff, self.workers = num_frames, timeout, int(retries), backoff, workers
        self.api_key_env = api_key_env
        self.question_fn = toy_world.default_question

    def frame_urls(self, video):
        import base64
        import io
        from PIL import Image
        urls = []
        for f in sample_frames(video[None], self.num_frames)[0]:
            buf = io.BytesIO()
            Image.fromarray((f.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()).save(buf, "PNG")
            urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
        return urls

    @staticmethod
    def server_message(raw, key=None, limit=300):
        """The message in a server's reply (`{"error": {"message": ...}}`, `{"error": "..."}`, `{"detail": ...}`,
        else the text itself), on one line, cut to `limit` characters, the API key masked."""
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        try:
            obj = json.loads(text)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            err = obj.get("error", obj.get("detail", obj.get("message")))
            if isinstance(err, dict):
                err = err.get("message", err)
            if err is not None:
                text = err if isinstance(err, str) else json.dumps(err)
        text = " ".join(text.split())
        if key:
            text = text.replace(key, "***")
        return text if len(text) <= limit else text[:limit] + "..."

    def post(self, body):
        import http.client
        import sys
        import time
        import urllib.error
        import urllib.request
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data, last, kind = json.dumps(body).encode(), None, None
        for attempt in range(self.retries + 1):
            if attempt:
                delay = self.backoff * 2 ** (attempt - 1)
                print(f"api judge: {self.url}: {last}; retry {attempt}/{self.retries} in {delay:g} s",
                      file=sys.stderr, flush=True)
                time.sleep(delay)
            try:
                with urllib.request.urlopen(urllib.request.Request(self.url, data, headers), timeout=self.timeout) as r:
                    raw = r.read()
            except urllib.error.HTTPError as e:
                if e.code in (401, 403):  # never quoted: a server may echo the key it was sent
                    e.close()
                    state = "it is not set" if not key else "it is set; is it valid for this server?"
                    raise RuntimeError(f"judge server {self.url} refused the request: HTTP {e.code} unauthorized: "
                                       f"check {self.api_key_env} ({state})") from None
                try:
                    message = self.server_message(e.read(), key)
                except (OSError, http.client.HTTPException):
                    message = ""
                finally:
                    e.close()
                if e.code not in (429, 500, 502, 503, 504):  # the request itself is wrong: retrying will not help
                    hint = " (is the URL the server's /v1 base?)" if e.code == 404 else ""
                    raise RuntimeError(f"judge server {self.url} refused the request: HTTP {e.code}: "
                                       f"{message or '(no message)'}{hint}") from None
                last, kind = f"HTTP {e.code}: {message or '(no message)'}", "server"
                continue
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                reason = getattr(e, "reason", e)
                if isinstance(e, TimeoutError) or isinstance(reason, TimeoutError):
                    last, kind = f"no answer within {self.timeout:g} s", "timeout"
                else:
                    last, kind = str(reason) or type(reason).__name__, "unreachable"
                continue
            try:
                resp = json.loads(raw)
            except ValueError:
                last, kind = f"malformed JSON reply: {self.server_message(raw, key)!r}", "server"
                continue
            if isinstance(resp, dict) and "error" in resp:
                last, kind = f"error reply: {self.server_message(raw, key)}", "server"
                continue
            choices = resp.get("choices") if isinstance(resp, dict) else None
            if not (isinstance(choices, list) and choices and isinstance(choices[0], dict)):
                last, kind = f"reply without choices: {self.server_message(raw, key)!r}", "server"
                continue
            return resp
        tries = f"{self.retries + 1} tr{'y' if self.retries == 0 else 'ies'}"
        if kind == "timeout":
            raise TimeoutError(f"judge server {self.url} gave no answer within {self.timeout:g} s ({tries}): is it "
                               f"overloaded or hung? Allow more time (--judge-timeout) or check the server") from None
        if kind == "server":
            raise RuntimeError(f"judge server {self.url} failed after {tries} ({last})") from None
        raise ConnectionError(f"judge server {self.url} unreachable after {tries} ({last}): start it "
                              f"(e.g. `vllm serve Qwen/Qwen2.5-VL-7B-Instruct`) or fix the URL in the spec") from None

    def ask(self, video, prompt):
        content = [{"type": "image_url", "image_url": {"url": u}} for u in self.frame_urls(video)]
        content.append({"type": "text", "text": self.question_fn(prompt)})
        resp = self.post({"model": self.model, "messages": [{"role": "user", "content": content}], "max_tokens": 1,
                          "temperature": 0.0, "logprobs": True, "top_logprobs": 20})
        choice = resp["choices"][0]
        top = (((choice.get("logprobs") or {}).get("content") or [{}])[0]).get("top_logprobs") or []
        mass = {"yes": 0.0, "no": 0.0}
        for t in top:
            word = str(t.get("token") or "").strip().lower() if isinstance(t, dict) else ""
            if word in mass and isinstance(t.get("logprob"), (int, float)):
                mass[word] += math.exp(t["logprob"])
        if mass["yes"] + mass["no"] > 0:
            return mass["yes"] / (mass["yes"] + mass["no"])
        answer = (choice.get("message") or {}).get("content") or ""
        return 1.0 if answer.strip().lower().startswith("yes") else 0.0

    @torch.no_grad()
    def __call__(self, videos, prompts):
        import concurrent.futures
        with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
            p_yes = torch.tensor(list(pool.map(self.ask, videos, prompts)))
        out = {"p_yes": p_yes, "yes": (p_yes > 0.5).float()}
        out["reward"] = out[self.dimension]
        return out


# ----------------------------------------------------------------------------------------------
# Specs and weighted sums
# ----------------------------------------------------------------------------------------------
REWARD_ALIASES.update({"videoscore2": "TIGER-Lab/VideoScore2", "videoreward": "KwaiVGI/VideoReward",
                       "videomae": "MCG-NJU/videomae-base-finetuned-kinetics", "vjepa2": "facebook/vjepa2-vitl-fpc64-256"})
REWARDS = {  # name -> constructor(dimension or None, weights path or None, device, dtype)
    # the toy world's analytic reward and binary judge (toy_world.py)
    "toy": lambda dim, path, device, dtype: toy_world.ToyReward(dim or "temporal_consistency"),
    "judge": lambda dim, path, device, dtype: toy_world.ToyJudge(dim or "yes"),
    "videoscore": lambda dim, path, device, dtype: VideoScore(resolve_weights(path or "videoscore"),
                                                              dim or "temporal_consistency", device, dtype),
    **{kind: (lambda kind: lambda frames, path, device, dtype: CLIPFrameReward(
        resolve_weights(path or CLIP_ALIASES[kind]), kind, device, dtype, frames or "mean"))(kind) for kind in CLIP_ALIASES},
    # vlm[:model alias][@folder]: the part after ':' names the VLM (qwen2.5-vl, ...), the answer is P(yes)
    "vlm": lambda alias, path, device, dtype: VLMJudge(resolve_weights(path or VLM_ALIASES[alias or "qwen2.5-vl"]),
                                                       "yes", device, dtype),
    "videoscore2": lambda dim, path, device, dtype: VideoScore2(resolve_weights(path or "videoscore2"),
                                                                dim or "visual_quality", device, dtype),
    "videoreward": lambda dim, path, device, dtype: VideoReward(resolve_weights(path or "videoreward"),
                                                                dim or "overall", device, dtype),
    "videomae": lambda label, path, device, dtype: VideoMAEAction(resolve_weights(path or "videomae"), label, device, dtype),
    "vjepa2": lambda dim, path, device, dtype: VJEPA2Consistency(resolve_weights(path or "vjepa2"), dim, device, dtype),
    # api:<served model name>@<base URL>: a yes/no judge behind an OpenAI-compatible server (no weights here);
    # the served name may hold colons (Ollama's llava:13b); keywords: APIJudge's timeout and retries
    "api": lambda model, url, device, dtype, **kw: APIJudge(url or "http://localhost:8000/v1", model or "default", **kw),
}
DIMENSIONS = {"judge": toy_world.ToyJudge.dimensions, "videoscore": VIDEOSCORE_DIMENSIONS, "vlm": sorted(VLM_ALIASES),
              **{kind: ["mean", "random"] for kind in CLIP_ALIASES},  # frame-wise rewards: how frames are aggregated
              "videoscore2": VideoScore2.dimensions, "videoreward": VideoReward.dimensions,
              "vjepa2": VJEPA2Consistency.dimensions}  # videomae: any class label of the checkpoint; api: any model name


class WeightedSum:
    """sum_i w_i * reward_i; every dimension of every term is kept, prefixed by its term's name."""

    def __init__(self, terms):
        self.terms = terms  # [(weight, reward)]
        self.differentiable = all(r.differentiable for _, r in terms)
        self.num_frames = next((r.num_frames for _, r in terms if r.num_frames), None)
        self.resolution = next((r.resolution for _, r in terms if r.resolution), None)
        self.name = "+".join(f"{r.name}*{w:g}" for w, r in terms)
        self.dimensions = [f"{r.name}/{d}" for _, r in terms for d in r.dimensions]

    @property
    def fps(self):
        return next((r.fps for _, r in self.terms if r.fps), None)

    @fps.setter
    def fps(self, value):  # the clip's frame rate reaches every term
        for _, r in self.terms:
            r.fps = value

    def __call__(self, videos, prompts):
        out, total = {}, 0
        for w, r in self.terms:
            o = r(videos, prompts)
            total = total + w * o["reward"]
            out.update({f"{r.name}/{k}": v for k, v in o.items() if k != "reward"})
        out["reward"] = total
        return out

    def patch_scores(self, videos, prompts, grid):
        return sum(w * r.patch_scores(videos, prompts, grid) for w, r in self.terms)


def parse_reward_spec(spec):
    """'toy:quality*0.5+toy:temporal' -> [(0.5, 'toy', 'quality', None), (1.0, 'toy', 'temporal', None)]
    (weight, name, dimension, weights folder or URL); validates names and dimensions without loading anything.
    `api:<model>@<url>`: everything between the first ':' and the '@' is the served model's name, colons
    included (Ollama's `api:llava:13b@http://localhost:11434/v1`)."""
    terms = []
    for part in spec.replace(" ", "").split("+"):
        m = re.fullmatch(r"([A-Za-z0-9_\-]+)(?::([A-Za-z0-9_.\-/:]+))?(?:@([^*+]+))?(?:\*([0-9.eE+-]+))?", part)
        if not m:
            raise ValueError(f"cannot parse reward spec {part!r}: use name[:dimension][@weights-folder][*weight] "
                             f"terms joined by '+'")
        name, dim, path, w = m.group(1), m.group(2), m.group(3), float(m.group(4) or 1.0)
        if name not in REWARDS:
            raise ValueError(f"unknown reward {name!r}: valid are {sorted(REWARDS)}")
        if name != "api" and dim and ":" in dim:
            raise ValueError(f"cannot parse reward spec {part!r}: one ':dimension' at most (only api:<model> "
                             f"names may hold colons)")
        if name == "toy" and dim:
            dim = toy_world.canonical_toy_dimension(dim)
        if name in DIMENSIONS and dim and dim not in DIMENSIONS[name]:
            raise ValueError(f"unknown {name} dimension {dim!r}: valid are {DIMENSIONS[name]}")
        terms.append((w, name, dim, path))
    return terms


def load_reward(spec, device="cpu", dtype=torch.float32, fps=None, judge_timeout=None, judge_retries=None):
    """`name[:dimension][@weights-folder][*weight]` terms joined by '+'; see the module docstring. `fps`: the
    frame rate of the clips it will score (also settable later as `reward.fps`); the rewards that sample
    frames by time (videoscore2, videoreward, a Qwen3-VL vlm) refuse to guess it. `judge_timeout` (seconds
    per try) and `judge_retries` reach every `api:` term (None: APIJudge's defaults); other rewards ignore them."""
    api = {k: v for k, v in (("timeout", judge_timeout), ("retries", judge_retries)) if v is not None}
    terms = [(w, REWARDS[name](dim, path, device, dtype, **(api if name == "api" else {})))
             for w, name, dim, path in parse_reward_spec(spec)]
    reward = terms[0][1] if len(terms) == 1 and terms[0][0] == 1.0 else WeightedSum(terms)
    if fps is not None:
        reward.fps = fps
    return reward
