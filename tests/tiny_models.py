"""Tiny random text-to-video pipelines of every supported family, built from config classes and
saved with the stock pipeline's save_pretrained, so tests load them back through the production
from_pretrained path (no weights can be downloaded here)."""
import json
import os
import re

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

WORDS = "a the red green blue yellow magenta cyan square circle triangle moving left right up down falling " \
        "bouncing staying still pushing cat dog ball video of with and in on".split()
SIZES = {  # family -> (num_frames, height, width) the tiny model is tested at
    "wan": (9, 16, 16), "cogvideox": (9, 16, 16), "ltx": (9, 32, 32), "modelscope": (4, 16, 16),
    "wan_a14b": (9, 16, 16)}  # Wan 2.2 A14B: two experts (transformer, transformer_2) switched at boundary_ratio
SIZES["hunyuan15"] = (9, 32, 32)  # the real VAE's 4x / 16x compression: latents 3 x 2 x 2


def word_tokenizer(max_len, clip_style=False):
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_len)


SPACED = r"[A-Za-z]+|\d|\s|[^A-Za-z\d\s]"  # words, single digits, every space/newline, every other character


def spaced_tokenizer(texts=(), bos=False, max_len=32768):
    """A word-level tokenizer that keeps every space and newline as a token of its own, as the real BPE
    tokenizers do where it matters here (the trailing space VideoScore pools at, the space before a score
    digit). Its vocabulary: the pieces of `texts` and WORDS (others are <unk>); `bos` prepends <s> like
    Mistral's tokenizer (VideoScore); decoding joins the pieces back."""
    pieces = sorted({p for t in list(texts) + [" ".join(WORDS), "0123456789"] for p in re.findall(SPACED, t)})
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3} | {p: i + 4 for i, p in enumerate(pieces)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(SPACED), behavior="isolated")
    tok.decoder = decoders.Fuse()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", model_max_length=max_len)


def t5_encoder(d_model=32, umt5=True):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel
    cfg_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    return model_cls(cfg_cls(vocab_size=len(WORDS) + 3, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                             relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                             decoder_start_token_id=0))


QWEN_CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                      "'<|im_end|>\\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\\n'}}{% endif %}")


def qwen2_byte_tokenizer():
    """A Qwen2Tokenizer (byte-level BPE, the real class) whose vocabulary is the 256 byte symbols and no merges,
    with Qwen's chat markers and a ChatML template: HunyuanVideo 1.5's prompt template tokenizes as in the real
    one, one token per byte."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer
    tok = Qwen2Tokenizer(vocab={c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}, merges=[])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def hunyuan15_components(scheduler=None, guidance=4.0):
    """Tiny random HunyuanVideo 1.5 parts: Qwen2.5-VL text model (3 layers: the pipeline reads layer -3), ByT5
    (T5 encoder + the byte tokenizer), the DiT (latent 4 channels -> input 2 * 4 + 1, text widths 32 and 24 so
    the two streams differ), the VAE at the real 4x temporal / 16x spatial compression, the CFG guider."""
    import diffusers as D
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, T5EncoderModel
    tok = qwen2_byte_tokenizer()
    text_encoder = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=len(tok), max_position_embeddings=2048, bos_token_id=None, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}))
    tok2 = ByT5Tokenizer()
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tok2), d_model=24, d_kv=8, d_ff=37, num_layers=2,
                                             num_heads=3, relative_attention_num_buckets=8, dropout_rate=0.0,
                                             pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    transformer = D.HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2, num_refiner_layers=1,
        mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=32, text_embed_2_dim=24, image_embed_dim=12,
        rope_axes_dim=(2, 2, 4), target_size=32, task_type="t2v")
    vae = D.AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8, 8, 8, 8, 8), layers_per_block=1,
                                        spatial_compression_ratio=16, temporal_compression_ratio=4)
    return dict(tokenizer=tok, text_encoder=text_encoder, tokenizer_2=tok2, text_encoder_2=text_encoder_2,
                transformer=transformer, vae=vae, scheduler=scheduler or D.FlowMatchEulerDiscreteScheduler(shift=5.0),
                guider=D.ClassifierFreeGuidance(guidance_scale=guidance))


def build(family, folder, seed=0, scheduler=None, **kw):
    """Build a tiny random pipeline of `family`, save it to `folder`, return the pipeline object."""
    import diffusers as D
    torch.manual_seed(seed)
    if family == "wan_a14b":
        def expert():
            return D.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                           in_channels=16, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32,
                                           num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                           rope_max_seq_len=32)
        pipe = D.WanPipeline(
            tokenizer=word_tokenizer(16), text_encoder=t5_encoder(), transformer=expert(), transformer_2=expert(),
            vae=D.AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                   temperal_downsample=[False, True, True]),
            scheduler=scheduler or D.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                             flow_shift=3.0),
            boundary_ratio=kw.get("boundary_ratio", 0.875))
    elif family == "wan":
        pipe = D.WanPipeline(
            tokenizer=word_tokenizer(16), text_encoder=t5_encoder(),
            transformer=D.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                                in_channels=16, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32,
                                                num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                                rope_max_seq_len=32),
            vae=D.AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                   temperal_downsample=[False, True, True]),
            scheduler=scheduler or D.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                             flow_shift=3.0))
    elif family == "cogvideox":
        pipe = D.CogVideoXPipeline(
            tokenizer=word_tokenizer(16), text_encoder=t5_encoder(umt5=False),
            transformer=D.CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                                      out_channels=4, time_embed_dim=2, text_embed_dim=32, num_layers=1,
                                                      sample_width=2, sample_height=2, sample_frames=9, patch_size=2,
                                                      temporal_compression_ratio=4, max_text_seq_length=226,
                                                      use_rotary_positional_embeddings=kw.get("rotary", True)),
            vae=D.AutoencoderKLCogVideoX(in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
                                         up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                         latent_channels=4, layers_per_block=1, norm_num_groups=2,
                                         temporal_compression_ratio=4),
            scheduler=scheduler or D.CogVideoXDDIMScheduler(prediction_type="v_prediction", timestep_spacing="trailing",
                                                            clip_sample=False, rescale_betas_zero_snr=True))
    elif family == "ltx":
        vae = D.AutoencoderKLLTXVideo(in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
                                      decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
                                      decoder_layers_per_block=(1, 1, 1, 1, 1),
                                      spatio_temporal_scaling=(True, True, False, False),
                                      decoder_spatio_temporal_scaling=(True, True, False, False),
                                      decoder_inject_noise=(False, False, False, False, False),
                                      upsample_residual=(False, False, False, False), upsample_factor=(1, 1, 1, 1),
                                      timestep_conditioning=False, patch_size=1, patch_size_t=1, encoder_causal=True,
                                      decoder_causal=False)
        vae.use_framewise_encoding = vae.use_framewise_decoding = False
        pipe = D.LTXPipeline(
            tokenizer=word_tokenizer(16), text_encoder=t5_encoder(umt5=False),
            transformer=D.LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                                     num_attention_heads=4, attention_head_dim=8, cross_attention_dim=32,
                                                     num_layers=1, caption_channels=32),
            vae=vae, scheduler=scheduler or D.FlowMatchEulerDiscreteScheduler())
    elif family == "modelscope":
        from transformers import CLIPTextConfig, CLIPTextModel
        pipe = D.TextToVideoSDPipeline(
            tokenizer=word_tokenizer(16),
            text_encoder=CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, hidden_size=8, intermediate_size=37,
                                                      num_attention_heads=2, num_hidden_layers=2, pad_token_id=0,
                                                      vocab_size=len(WORDS) + 3, max_position_embeddings=16)),
            unet=D.UNet3DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=16, in_channels=4,
                                        out_channels=4, down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                                        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), cross_attention_dim=8,
                                        attention_head_dim=4, norm_num_groups=2),
            vae=D.AutoencoderKL(block_out_channels=[8, 8], in_channels=3, out_channels=3,
                                down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                                latent_channels=4, sample_size=16, norm_num_groups=2),
            scheduler=scheduler or D.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                   clip_sample=False, set_alpha_to_one=False))
    elif family == "hunyuan15":
        pipe = D.HunyuanVideo15Pipeline(**hunyuan15_components(scheduler))
    else:
        raise ValueError(family)
    pipe.save_pretrained(folder)
    return pipe


TINY_IDEFICS2_PROCESSOR = {  # VideoScore's processor settings (aspect kept, no splitting) at a tiny pixel budget
    "image_processor_type": "Idefics2ImageProcessor", "do_image_splitting": False, "do_resize": True, "resample": 2,
    "size": {"shortest_edge": 28, "longest_edge": 56}, "do_rescale": True, "rescale_factor": 1 / 255,
    "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_pad": True}


def build_videoscore(folder, seed=0, processor=None, bias=True, texts=()):
    """A tiny random checkpoint laid out like VideoScore v1.1: Idefics2 base weights under `model.` plus
    a 5-way regression head `score.weight` (and `score.bias`: Mantis' head is nn.Linear with its default
    bias), a tokenizer that keeps spaces as tokens and prepends <s> like Mistral's, with the Idefics2 image
    tokens, and the processor's `preprocessor_config.json` (`processor`, else a tiny pixel budget)."""
    from safetensors.torch import save_file
    from transformers import Idefics2Config, Idefics2Model
    tok = spaced_tokenizer(texts, bos=True)
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<fake_token_around_image>"]})
    torch.manual_seed(seed)
    cfg = Idefics2Config(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        perceiver_config=dict(hidden_size=32, resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2,
                              resampler_head_dim=8, num_key_value_heads=1),
        text_config=dict(model_type="mistral", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=len(tok),
                         pad_token_id=tok.pad_token_id),
        image_token_id=tok.convert_tokens_to_ids("<image>"), architectures=["Idefics2ForSequenceClassification"])
    base = Idefics2Model(cfg)
    state = {f"model.{k}": v.contiguous() for k, v in base.state_dict().items()}
    state["score.weight"] = torch.randn(5, 32) * 0.2
    if bias:
        state["score.bias"] = torch.randn(5) * 0.5 + 2.5
    os.makedirs(folder, exist_ok=True)
    cfg.save_pretrained(folder)
    save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(folder)
    json.dump(processor or TINY_IDEFICS2_PROCESSOR, open(os.path.join(folder, "preprocessor_config.json"), "w"))
    return base, state["score.weight"]


def build_qwen_vl(folder, seed=0, version="2.5", reward_head=None, chat_template=None, texts=None, vocab_pad=0):
    """A tiny random Qwen2.5-VL (or Qwen2-VL, Qwen3-VL) checkpoint with a chat-style tokenizer (yes/no, the
    score digits, the video tokens), and `chat_template` saved with it when given. `reward_head=k` makes it
    a VideoReward checkpoint: the three special reward tokens, and `rm_head.weight` [k, hidden] saved
    beside the model's own weights. `texts`: a tokenizer that keeps spaces as tokens, its vocabulary
    the pieces of `texts` (else a whitespace-splitting one). `vocab_pad`: embedding rows past the tokenizer
    (Qwen's checkpoints have more rows than tokens)."""
    import transformers as T
    from safetensors.torch import load_file, save_file
    tok = word_tokenizer(4096) if texts is None else spaced_tokenizer(texts)
    tok.add_tokens(["yes", "no", "Yes", "No", "does", "fall", "downwards", "increasing", "speed", "answer", "or",
                    "1", "2", "3", "4", "5", "visual", "quality", ":"])
    specials = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|image_pad|>"]
    if reward_head:
        specials += ["<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>"]
    tok.add_special_tokens({"additional_special_tokens": specials})
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    torch.manual_seed(seed)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                vocab_size=len(tok) + vocab_pad, max_position_embeddings=2048,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
    token_ids = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                     vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if version in ("3", "3-moe"):
        text["rope_parameters"]["mrope_interleaved"] = True
        vision = dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0])
        if version == "3-moe":
            text.update(moe_intermediate_size=16, num_experts_per_tok=2, num_local_experts=4)
            model = T.Qwen3VLMoeForConditionalGeneration(T.Qwen3VLMoeConfig(text_config=text, vision_config=vision, **token_ids))
        else:
            model = T.Qwen3VLForConditionalGeneration(T.Qwen3VLConfig(text_config=text, vision_config=vision, **token_ids))
    elif version == "2.5":
        cfg = T.Qwen2_5_VLConfig(text_config=text, vision_config=dict(
            depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[0]), **token_ids)
        model = T.Qwen2_5_VLForConditionalGeneration(cfg)
    else:
        cfg = T.Qwen2VLConfig(text_config=text, vision_config=dict(
            depth=1, embed_dim=16, hidden_size=32, mlp_ratio=2, num_heads=2, patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2), **token_ids)
        model = T.Qwen2VLForConditionalGeneration(cfg)
    model.save_pretrained(folder)
    tok.chat_template = chat_template
    tok.save_pretrained(folder)
    if reward_head:  # VideoReward keeps its head in the same state dict as the backbone
        f = [n for n in os.listdir(folder) if n.endswith(".safetensors")][0]
        state = load_file(os.path.join(folder, f))
        state["rm_head.weight"] = torch.randn(reward_head, 32) * 0.2
        save_file(state, os.path.join(folder, f), metadata={"format": "pt"})
        return model, state["rm_head.weight"]
    return model


def build_videomae(folder, seed=0, num_frames=4):
    """A tiny VideoMAE Kinetics-style classifier and its processor config (shortest side, centre crop,
    bilinear, ImageNet mean/std, as videomae-base-finetuned-kinetics ships it) at 32 pixels."""
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification
    torch.manual_seed(seed)
    labels = ["playing guitar", "juggling balls", "falling off chair", "bouncing ball"]
    cfg = VideoMAEConfig(image_size=32, patch_size=16, num_frames=num_frames, tubelet_size=2, hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32, use_mean_pooling=True, num_labels=len(labels),
                         id2label=dict(enumerate(labels)), label2id={v: k for k, v in enumerate(labels)})
    VideoMAEForVideoClassification(cfg).save_pretrained(folder)
    json.dump({"image_processor_type": "VideoMAEImageProcessor", "do_resize": True, "size": {"shortest_edge": 32},
               "resample": 2, "do_center_crop": True, "crop_size": {"height": 32, "width": 32}, "do_rescale": True,
               "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.485, 0.456, 0.406],
               "image_std": [0.229, 0.224, 0.225]}, open(os.path.join(folder, "preprocessor_config.json"), "w"))


def build_vjepa2(folder, seed=0):
    from transformers import VJEPA2Config, VJEPA2Model
    torch.manual_seed(seed)
    cfg = VJEPA2Config(patch_size=16, crop_size=32, frames_per_clip=8, tubelet_size=2, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, mlp_ratio=2.0, pred_hidden_size=16, pred_num_hidden_layers=1,
                       pred_num_attention_heads=2, pred_num_mask_tokens=2)
    VJEPA2Model(cfg).save_pretrained(folder)
    json.dump({"video_processor_type": "VJEPA2VideoProcessor", "crop_size": {"height": 32, "width": 32},
               "size": {"shortest_edge": int(32 * 256 / 224)}, "resample": 2, "do_center_crop": True,
               "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]},
              open(os.path.join(folder, "video_preprocessor_config.json"), "w"))


def build_clip(folder, seed=0, aesthetic=False):
    """A tiny random CLIPModel checkpoint (+ the LAION aesthetic MLP's weights when asked)."""
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPModel
    tok = word_tokenizer(77)
    torch.manual_seed(seed)
    cfg = CLIPConfig(text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      vocab_size=len(tok), max_position_embeddings=32, eos_token_id=1, bos_token_id=0,
                                      pad_token_id=0),
                     vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        image_size=28, patch_size=14), projection_dim=8)
    model = CLIPModel(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    if aesthetic:
        sizes = [8, 32, 16, 8, 4, 1]
        w = {}
        for (i, a, b) in zip((0, 2, 4, 6, 7), sizes[:-1], sizes[1:]):
            w[f"layers.{i}.weight"], w[f"layers.{i}.bias"] = torch.randn(b, a) * 0.3, torch.randn(b) * 0.1
        save_file(w, f"{folder}/aesthetic_mlp.safetensors")
    return model


VIDEOREWARD_TOKENS = ["<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>"]
VIDEOALIGN_LORA_TARGETS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                           "mlp.up_proj", "mlp.down_proj"]


def build_videoreward_release(folder, seed=0, fmt="lora", texts=(), chat_template=None, data_config=None):
    """VideoAlign's release layout (KwaiVGI/VideoAlign `utils.load_model_from_checkpoint`, `train.sh`):
    folder/model_config.json and folder/checkpoint-<step>/ holding either `adapter_model.safetensors` +
    `non_lora_state_dict.pth` (fmt="lora": LoRA r=4, alpha=8 on the LLM's linear layers; the vision tower,
    merger, `rm_head` [3, hidden] and the token embeddings trained in full) or one `model.pth` (fmt="full":
    the PEFT model's whole state dict). Keys are named as transformers 4.45 named them. The base Qwen2-VL
    (no reward tokens, embedding rows past the tokenizer like Qwen's) is folder/base; an older
    checkpoint-50 holds other weights (the latest step must win). Also writes folder/merged: the same reward
    model as a plain checkpoint, LoRA merged by hand (W + alpha / r * B @ A), to compare against."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer
    base = os.path.join(folder, "base")
    build_qwen_vl(base, seed=seed, version="2", texts=texts, chat_template=chat_template, vocab_pad=7)
    base_state = load_file(os.path.join(base, "model.safetensors"))
    tok = AutoTokenizer.from_pretrained(base)
    tok.add_special_tokens({"additional_special_tokens": VIDEOREWARD_TOKENS})
    n = len(tok)  # VideoAlign: model.resize_token_embeddings(len(tokenizer)) keeps the first n rows
    g = torch.Generator().manual_seed(seed + 1)
    r, alpha = 4, 8

    def trained(step):
        state = {k: v.clone() for k, v in base_state.items()}
        state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][:n].clone()
        state["model.embed_tokens.weight"][n - 3:] += torch.randn(3, 32, generator=g)
        state["lm_head.weight"] = state["lm_head.weight"][:n].clone()
        for k in state:
            if k.startswith("visual."):
                state[k] = state[k] + 0.05 * torch.randn(state[k].shape, generator=g)
        state["rm_head.weight"] = torch.randn(3, 32, generator=g) * 0.3
        lora = {}
        for k in base_state:
            m = k[: -len(".weight")]
            if k.startswith("model.layers.") and k.endswith(".weight") and any(m.endswith(t) for t in VIDEOALIGN_LORA_TARGETS):
                out_f, in_f = base_state[k].shape
                lora[m] = (torch.randn(r, in_f, generator=g) * 0.2, torch.randn(out_f, r, generator=g) * 0.2)
        return state, lora

    def write(step, state, lora):
        ckpt = os.path.join(folder, f"checkpoint-{step}")
        os.makedirs(ckpt, exist_ok=True)
        if fmt == "lora":
            save_file({f"base_model.model.{m}.lora_{ab}.weight": w.contiguous() for m, (a, b) in lora.items()
                       for ab, w in (("A", a), ("B", b))}, os.path.join(ckpt, "adapter_model.safetensors"))
            json.dump({"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": False,
                       "target_modules": sorted(lora)}, open(os.path.join(ckpt, "adapter_config.json"), "w"))
            trainable = {k: v for k, v in state.items() if k.startswith(("visual.", "rm_head.", "model.embed_tokens."))}
            torch.save({f"base_model.model.{k}": v for k, v in trainable.items()}, os.path.join(ckpt, "non_lora_state_dict.pth"))
        else:
            full = {}
            for k, v in state.items():
                m = k.rsplit(".", 1)[0]
                full[f"base_model.model.{m}.base_layer.{k.rsplit('.', 1)[1]}" if m in lora else f"base_model.model.{k}"] = v
            for m, (a, b) in lora.items():
                full[f"base_model.model.{m}.lora_A.default.weight"] = a
                full[f"base_model.model.{m}.lora_B.default.weight"] = b
            torch.save(full, os.path.join(ckpt, "model.pth"))

    write(50, *trained(50))  # an older checkpoint: "checkpoint-50" sorts after "checkpoint-100" as text
    state, lora = trained(100)
    write(100, state, lora)
    data = {"fps": 2.0, "max_frame_pixels": 200704, "num_frames": None, "sample_type": "uniform",
            "prompt_template_type": "detailed_special", "eval_dim": ["VQ", "MQ", "TA"], "meta_data": "x.csv",
            "data_dir": "x"} | (data_config or {})
    json.dump({"data_config": data, "training_args": {},
               "model_config": {"model_name_or_path": base, "output_dim": 3, "use_special_tokens": True,
                                "reward_token": "special"},
               "peft_lora_config": {"lora_enable": fmt == "lora" or fmt == "full", "lora_r": r, "lora_alpha": alpha,
                                    "use_rslora": False},
               "inference_config": {"VQ_mean": 0.5, "VQ_std": 2.0, "MQ_mean": -0.5, "MQ_std": 1.5, "TA_mean": 0.1,
                                    "TA_std": 0.8}}, open(os.path.join(folder, "model_config.json"), "w"))
    merged = os.path.join(folder, "merged")  # the comparison: LoRA merged by hand into a plain checkpoint
    os.makedirs(merged, exist_ok=True)
    plain = dict(state)
    for m, (a, b) in lora.items():
        plain[f"{m}.weight"] = plain[f"{m}.weight"] + alpha / r * b @ a
    save_file({k: v.contiguous() for k, v in plain.items()}, os.path.join(merged, "model.safetensors"),
              metadata={"format": "pt"})
    cfg = json.load(open(os.path.join(base, "config.json")))
    cfg["text_config"]["vocab_size"] = n
    json.dump(cfg, open(os.path.join(merged, "config.json"), "w"))
    tok.save_pretrained(merged)
    shutil.copy(os.path.join(folder, "model_config.json"), merged)
    return base, merged
