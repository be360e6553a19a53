"""Our reward models' inputs against their reference inference code, on the same frames (docs/rewards_reference.md
quotes the reference lines). Where transformers' "slow" PIL/numpy processors run without torchvision
(Idefics2, CLIP, VideoMAE) they are the reference; the Qwen-VL and V-JEPA 2 video processors and
qwen-vl-utils need torchvision, so their arithmetic is re-derived below from the reference source. Prompts
are the reference templates (tests/reference_prompts.py, verbatim) rendered by the reference's own string
code, tokenized by tiny tokenizers that keep spaces as tokens. The model forward is stopped where a test
only compares inputs (the real pixel budgets would be slow on a CPU)."""
import math
from string import Template

import numpy as np
import pytest
import torch

import reference_prompts as ref
import rewards
import tiny_models

FRAME_TABLE = [(16, 8.0), (81, 16.0)]  # (frames, fps) of the clips the rewards see
SIZE_TABLE = [(480, 832), (256, 256), (320, 512)]  # (height, width)
PROMPTS = ["a red square falling", "a cat playing piano on a stage"]


class Stop(Exception):
    pass


def capture(module, stop=True):
    """Record the keyword inputs of `module`'s forward calls (stop at the first when `stop`)."""
    seen, orig = [], module.forward

    def forward(*args, **kw):
        seen.append(kw)
        if stop:
            raise Stop
        return orig(*args, **kw)
    module.forward = forward
    return seen


def run_captured(reward, module, videos, prompts):
    seen = capture(module)
    with pytest.raises(Stop):
        reward(videos, prompts)
    del module.forward
    return seen[0]


def uint8_clip(F, H, W, seed=0):
    """A clip whose pixels are exact uint8 values (what the reference decodes from a file): [F, 3, H, W] uint8."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(F, 3, max(H // 8, 2), max(W // 8, 2), generator=g)  # smooth content plus fine noise
    x = torch.nn.functional.interpolate(coarse, (H, W), mode="bilinear") * 0.8 + 0.2 * torch.rand(F, 3, H, W, generator=g)
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


def pil_frames(clip, idx):
    from PIL import Image
    return [Image.fromarray(clip[i].permute(1, 2, 0).numpy()) for i in idx]


def unpadded(ids, mask):
    return ids[mask.bool()].tolist()


# ---- VideoScore v1.1 ----------------------------------------------------------------------------------------
IDEFICS2_8B_PROCESSOR = dict(tiny_models.TINY_IDEFICS2_PROCESSOR, size={"shortest_edge": 378, "longest_edge": 980})


def videoscore_reference(folder, clip, prompt, image_seq_len=4, processor=None):
    """TIGER-AI-Lab/VideoScore examples/run_videoscore.py: up to 48 frames (np.arange(0, total, total / 48)),
    the regression query + "<image> " per frame, through transformers' Idefics2Processor (its PIL image
    processor: aspect kept, shortest/longest edge, bilinear, no splitting as Mantis trains it)."""
    from transformers import AutoTokenizer
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil
    from transformers.models.idefics2.processing_idefics2 import Idefics2Processor
    total = len(clip)
    idx = np.arange(0, total, total / 48).astype(int) if total > 48 else np.arange(total)
    prompt_text = ref.VIDEOSCORE_REGRESSION_QUERY_PROMPT.format(text_prompt=prompt) + "<image> " * len(idx)
    cfg = {k: v for k, v in (processor or tiny_models.TINY_IDEFICS2_PROCESSOR).items() if k != "image_processor_type"}
    proc = Idefics2Processor(Idefics2ImageProcessorPil(**cfg), AutoTokenizer.from_pretrained(folder),
                             image_seq_len=image_seq_len)
    return proc(text=prompt_text, images=pil_frames(clip, idx), return_tensors="pt"), idx


@pytest.fixture(scope="module")
def videoscore_real_budget(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vs_real_budget")
    tiny_models.build_videoscore(str(folder), processor=IDEFICS2_8B_PROCESSOR,
                                 texts=[ref.VIDEOSCORE_REGRESSION_QUERY_PROMPT] + PROMPTS)
    return str(folder)


@pytest.mark.parametrize("F,H,W", [(16, 480, 832), (81, 256, 256), (9, 320, 512)])
def test_videoscore_inputs_match_the_idefics2_processor(videoscore_real_budget, F, H, W):
    """Frames (all up to 48, else np.arange(0, F, F / 48)), aspect-kept size (longest 980, shortest >= 378),
    bilinear pixels and the token sequence ("<image> " per frame, expanded by the processor) all equal the
    reference's, on the same frames."""
    r = rewards.load_reward(f"videoscore@{videoscore_real_budget}")
    clip = uint8_clip(F, H, W)
    seen = run_captured(r, r.model, clip[None].float() / 255, PROMPTS[:1])
    want, idx = videoscore_reference(videoscore_real_budget, clip, PROMPTS[0], processor=IDEFICS2_8B_PROCESSOR)
    assert seen["pixel_values"].shape == want["pixel_values"].shape, (seen["pixel_values"].shape, want["pixel_values"].shape)
    assert len(idx) == min(F, 48)
    # PIL resamples uint8 with 8-bit rounding; ours stays in float: at most half a level apart (/ std 0.5)
    torch.testing.assert_close(seen["pixel_values"], want["pixel_values"], atol=1.01 / 255 / 0.5, rtol=0)
    assert seen["input_ids"][0].tolist() == want["input_ids"][0].tolist()


def test_videoscore_pixel_budget_table():
    for (H, W), want in zip(SIZE_TABLE, [(480, 832), (378, 378), (378, 512)]):
        assert rewards.idefics2_size(H, W, shortest=378, longest=980) == want
    assert rewards.idefics2_size(1080, 1920, 378, 980) == (551, 980)  # longest edge capped, aspect kept
    assert [len(rewards.videoscore_frame_indices(F)) for F, _ in FRAME_TABLE] == [16, 48]


def test_videoscore_pools_the_trailing_space_token_through_a_biased_head(tmp_path):
    """Mantis' Idefics2ForSequenceClassification: score = nn.Linear(hidden, 5) (with bias) at the last token of
    the processor's sequence, which is the space after the last "<image>"."""
    from safetensors.torch import load_file
    tiny_models.build_videoscore(str(tmp_path), texts=[ref.VIDEOSCORE_REGRESSION_QUERY_PROMPT] + PROMPTS)
    r = rewards.load_reward(f"videoscore:text_alignment@{tmp_path}")
    head = load_file(str(tmp_path / "model.safetensors"))
    assert torch.equal(r.head.bias, head["score.bias"])
    clips = [uint8_clip(5, 20, 36, seed=s) for s in (1, 2)]
    videos = (torch.stack(clips).float() / 255).requires_grad_(True)
    out = r(videos, PROMPTS)  # two prompts of different lengths: right padding
    for b, (clip, prompt) in enumerate(zip(clips, PROMPTS)):
        inputs, _ = videoscore_reference(str(tmp_path), clip, prompt)
        ids = inputs["input_ids"]
        assert r.tokenizer.convert_ids_to_tokens(ids[0, -1].item()) == " "  # the trailing space of "<image> "
        with torch.no_grad():
            hidden = r.model(input_ids=ids, attention_mask=inputs["attention_mask"],
                             pixel_values=inputs["pixel_values"]).last_hidden_state
        logits = hidden[0, -1] @ head["score.weight"].T + head["score.bias"]  # batch of one: the last token
        got = torch.stack([out[d][b] for d in rewards.VIDEOSCORE_DIMENSIONS])
        torch.testing.assert_close(got, logits, atol=2e-3, rtol=0)  # pixels within half a uint8 level
    out["reward"].sum().backward()
    assert videos.grad.abs().sum() > 0


# ---- Qwen-VL video inputs: qwen-vl-utils and VideoAlign's copy, re-derived -----------------------------------
def qwen_vl_utils_nframes(total, video_fps, fps=2.0, min_frames=4, max_frames=768):
    """qwen-vl-utils 0.0.10-0.0.14 smart_nframes (fps given): clamp to [4, min(768, total)], floor to even."""
    lo = math.ceil(min_frames / 2) * 2
    hi = math.floor(min(max_frames, total) / 2) * 2
    n = min(min(max(total / video_fps * fps, lo), hi), total)
    return math.floor(n / 2) * 2


def videoalign_nframes(total, video_fps, fps=2.0, min_frames=4, max_frames=768):
    """KwaiVGI/VideoAlign vision_process.py smart_nframes (fps given): clamp, ROUND to even, then cap at total."""
    lo = math.ceil(min_frames / 2) * 2
    hi = math.floor(min(max_frames, total) / 2) * 2
    n = round(min(max(total / video_fps * fps, lo), hi) / 2) * 2
    return total if n > total else n


def smart_resize(height, width, factor, min_pixels, max_pixels):
    """qwen-vl-utils smart_resize (the same in VideoAlign's copy)."""
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


VS2_MIN_PIXELS = 128 * 28 * 28  # qwen-vl-utils VIDEO_MIN_PIXELS


def vs2_max_pixels(nframes):  # qwen-vl-utils fetch_video: min(VIDEO_MAX_PIXELS, total_pixels / nframes * 2), >= 1.05 min
    return max(min(768 * 28 * 28, 128000 * 28 * 28 * 0.9 / nframes * 2), int(VS2_MIN_PIXELS * 1.05))


def qwen_reference_pixels(clip, nframes, size):
    """qwen-vl-utils fetch_video (frames at linspace(0, total - 1, n).round(), torchvision bicubic antialiased
    resize of the uint8 video) + the Qwen2-VL video processor (rescale, CLIP normalisation, patchify)."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    idx = torch.linspace(0, len(clip) - 1, nframes).round().long()
    x = torch.nn.functional.interpolate(clip[idx].float(), size, mode="bicubic", antialias=True).round().clamp(0, 255)
    x = (x / 255 - torch.tensor(rewards.CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(rewards.CLIP_STD).view(1, 3, 1, 1)
    # the Qwen2-VL video processor's patchify (the Qwen3-VL class holds the same code and imports here)
    pixels = Qwen3VLVideoProcessor.patchify(None, x[None], patch_size=14, merge_size=2, temporal_patch_size=2)[0][0]
    return pixels, torch.tensor([[math.ceil(nframes / 2), size[0] // 14, size[1] // 14]])


def qwen_reference_ids(tok, user_text, grid):
    """The processor's chat text (Qwen2-VL instruct template, a video then the text) with <|video_pad|>
    repeated grid.prod() / merge^2 times, tokenized."""
    msgs = [{"role": "user", "content": [{"type": "video", "video": "clip.mp4", "fps": 2.0},
                                         {"type": "text", "text": user_text}]}]
    text = tok.apply_chat_template(msgs, chat_template=ref.QWEN2_VL_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True)
    return tok(text.replace("<|video_pad|>", "<|video_pad|>" * (int(grid.prod()) // 4))).input_ids


QWEN_TEXTS = [ref.VS2_QUERY_TEMPLATE, ref.DETAILED_PROMPT_WITH_SPECIAL_TOKEN, "\n<think>\n\n</think>\n\n"
              "(1) visual quality: (2) text-to-video alignment: (3) physical/common-sense consistency:"] + PROMPTS


@pytest.fixture(scope="module")
def vs2_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vs2")
    tiny_models.build_qwen_vl(str(folder), version="2.5", texts=QWEN_TEXTS, chat_template=ref.QWEN2_VL_CHAT_TEMPLATE)
    return str(folder)


def test_frame_count_tables():
    """Frames sampled at 2 fps of the clip's real frame rate: qwen-vl-utils (VideoScore2) floors to an even
    count within [4, total]; VideoAlign's copy rounds to even, then caps at the total."""
    for F, fps in FRAME_TABLE + [(9, 16.0), (33, 16.0), (49, 24.0), (57, 16.0), (3, 8.0)]:
        assert rewards.fps_frame_count(F, fps) == qwen_vl_utils_nframes(F, fps), (F, fps)
        assert rewards.fps_frame_count(F, fps, videoalign=True) == videoalign_nframes(F, fps), (F, fps)
    assert [rewards.fps_frame_count(F, fps) for F, fps in FRAME_TABLE] == [4, 10]
    assert rewards.fps_frame_count(57, 16.0) == 6 and rewards.fps_frame_count(57, 16.0, videoalign=True) == 8


def test_qwen_pixel_budget_tables():
    for (H, W), vs2, va in zip(SIZE_TABLE, [(476, 840), (336, 336), (308, 504)], [(336, 588), (336, 336), (308, 504)]):
        assert smart_resize(H, W, 28, VS2_MIN_PIXELS, vs2_max_pixels(10)) == vs2
        assert rewards.smart_resize(H, W, 28, VS2_MIN_PIXELS, rewards.qwen_vl_utils_max_pixels(10)) == vs2
        assert smart_resize(H, W, 28, VS2_MIN_PIXELS, 200704) == va
        assert rewards.smart_resize(H, W, 28, VS2_MIN_PIXELS, 200704) == va


@pytest.mark.parametrize("F,fps", FRAME_TABLE)
@pytest.mark.parametrize("H,W", SIZE_TABLE)
def test_videoscore2_inputs_match_qwen_vl_utils_and_its_prompt(vs2_folder, F, fps, H, W):
    r = rewards.load_reward(f"videoscore2@{vs2_folder}")
    r.fps = fps
    clip = uint8_clip(F, H, W)
    seen = run_captured(r, r.model.model, clip[None].float() / 255, PROMPTS[:1])
    n = qwen_vl_utils_nframes(F, fps)
    h, w = smart_resize(H, W, 28, VS2_MIN_PIXELS, vs2_max_pixels(n))
    pixels, grid = qwen_reference_pixels(clip, n, (h, w))
    assert seen["video_grid_thw"].tolist() == grid.tolist()
    torch.testing.assert_close(seen["pixel_values_videos"], pixels, atol=0.51 / 255 / min(rewards.CLIP_STD), rtol=0)
    assert seen["second_per_grid_ts"].tolist() == [1.0]  # the processor gets fps=2.0: 2 frames per temporal patch = 1 s
    # the reference's prompt, chat turn and placeholder, then our teacher-forced start of the answer
    query = Template(ref.VS2_QUERY_TEMPLATE).substitute(t2v_prompt=PROMPTS[0])
    want = qwen_reference_ids(r.tokenizer, query, grid)
    answer = r.tokenizer("\n<think>\n\n</think>\n\n(1) visual quality: ", add_special_tokens=False).input_ids
    assert unpadded(seen["input_ids"][0], seen["attention_mask"][0]) == want + answer


def soft_score_normed(logits, tokenizer, temperature=0.7):
    """vs2_inference.py ll_based_soft_score_normed on generate()'s scores (the logits after the temperature
    warper): the best score 1-5 times its probability over the five score tokens' total."""
    logp = torch.log_softmax(logits / temperature, -1)
    probs = [math.exp(logp[tokenizer.encode(str(s), add_special_tokens=False)[0]].item()) for s in range(1, 6)]
    best = max(range(5), key=lambda i: probs[i])
    return (best + 1) * probs[best] / sum(probs), best + 1


def test_videoscore2_reads_the_reference_soft_score_after_an_empty_think_block(vs2_folder):
    r = rewards.load_reward(f"videoscore2:text_alignment@{vs2_folder}")
    r.fps = 8.0
    clips = [uint8_clip(8, 28, 56, seed=s) for s in (3, 4)]
    videos = (torch.stack(clips).float() / 255).requires_grad_(True)
    out = r(videos, PROMPTS)
    n = qwen_vl_utils_nframes(8, 8.0)
    h, w = smart_resize(28, 56, 28, VS2_MIN_PIXELS, vs2_max_pixels(n))
    lines = ["(1) visual quality: ", "(2) text-to-video alignment: ", "(3) physical/common-sense consistency: "]
    for b, (clip, prompt) in enumerate(zip(clips, PROMPTS)):
        pixels, grid = qwen_reference_pixels(clip, n, (h, w))
        ids = qwen_reference_ids(r.tokenizer, Template(ref.VS2_QUERY_TEMPLATE).substitute(t2v_prompt=prompt), grid)
        answer = "\n<think>\n\n</think>\n\n"
        for dim, line in zip(rewards.VIDEOSCORE2_DIMENSIONS, lines):
            answer += line
            x = torch.tensor([ids + r.tokenizer(answer, add_special_tokens=False).input_ids])
            with torch.no_grad():
                logits = r.model(input_ids=x, mm_token_type_ids=(x == r.model.config.video_token_id).int() * 2,
                                 pixel_values_videos=pixels, video_grid_thw=grid,
                                 second_per_grid_ts=torch.tensor([1.0])).logits[0, -1]
            soft, best = soft_score_normed(logits, r.tokenizer)
            assert abs(out[dim][b].item() - soft) < 2e-3, (dim, out[dim][b].item(), soft)
            p = torch.softmax(logits[r.score_ids], -1)
            assert abs(out[f"{dim}_expected"][b].item() - (p * torch.arange(1.0, 6.0)).sum().item()) < 2e-3
            answer += f"{best}\n"  # the model's own (greedy) digit before the next line
    assert torch.equal(out["reward"], out["text_alignment"])
    out["reward"].sum().backward()  # the reference read-out: gradient through the winning probability
    assert videos.grad.abs().sum() > 0
    videos.grad = None
    r2 = rewards.load_reward(f"videoscore2:visual_quality_expected@{vs2_folder}", fps=8.0)
    r2(videos, PROMPTS)["reward"].sum().backward()
    assert videos.grad.abs().sum() > 0


def test_qwen_video_rewards_need_the_clips_frame_rate(vs2_folder, tmp_path):
    r = rewards.load_reward(f"videoscore2@{vs2_folder}")
    with pytest.raises(ValueError, match="reward.fps"):
        r(torch.rand(1, 8, 3, 28, 28), ["x"])
    tiny_models.build_qwen_vl(str(tmp_path / "q3"), version="3")
    judge = rewards.load_reward(f"vlm@{tmp_path / 'q3'}")  # Qwen3-VL's timestamps need it too
    with pytest.raises(ValueError, match="reward.fps"):
        judge(torch.rand(1, 8, 3, 32, 32), ["x"])
    both = rewards.load_reward(f"videoscore2@{vs2_folder}+toy:quality", fps=12.0)
    assert both.fps == 12.0 and both.terms[0][1].fps == 12.0
    both.fps = 16.0
    assert both.terms[0][1].fps == 16.0


# ---- VideoReward (VideoAlign) -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def videoreward_release(tmp_path_factory):
    d = tmp_path_factory.mktemp("videoreward")
    tiny_models.build_videoreward_release(str(d / "lora"), fmt="lora", texts=QWEN_TEXTS,
                                          chat_template=ref.QWEN2_VL_CHAT_TEMPLATE)
    tiny_models.build_videoreward_release(str(d / "full"), fmt="full", texts=QWEN_TEXTS,
                                          chat_template=ref.QWEN2_VL_CHAT_TEMPLATE)
    return d


@pytest.mark.parametrize("F,fps", FRAME_TABLE)
@pytest.mark.parametrize("H,W", SIZE_TABLE)
def test_videoreward_inputs_match_videoalign(videoreward_release, F, fps, H, W):
    r = rewards.load_reward(f"videoreward@{videoreward_release / 'lora' / 'merged'}")
    r.fps = fps
    clip = uint8_clip(F, H, W)
    seen = run_captured(r, r.model.model, clip[None].float() / 255, PROMPTS[:1])
    n = videoalign_nframes(F, fps)
    h, w = smart_resize(H, W, 28, VS2_MIN_PIXELS, 200704)  # train.sh --max_frame_pixels 200704
    pixels, grid = qwen_reference_pixels(clip, n, (h, w))
    assert seen["video_grid_thw"].tolist() == grid.tolist()
    torch.testing.assert_close(seen["pixel_values_videos"], pixels, atol=0.51 / 255 / min(rewards.CLIP_STD), rtol=0)
    want = qwen_reference_ids(r.tokenizer, ref.DETAILED_PROMPT_WITH_SPECIAL_TOKEN.format(text_prompt=PROMPTS[0]), grid)
    assert unpadded(seen["input_ids"][0], seen["attention_mask"][0]) == want


def test_videoreward_scores_as_videoalign_from_its_release_checkpoints(videoreward_release):
    """model_config.json + checkpoint-*/ (LoRA adapter + non-LoRA state, or one model.pth) load to the same
    scores as the hand-merged plain checkpoint, and those are VideoAlign's: rm_head at the three special
    tokens, the diagonal of the 3x3 output, normalised by inference_config, overall = their sum."""
    import json
    merged = videoreward_release / "lora" / "merged"
    plain = rewards.load_reward(f"videoreward@{merged}")
    plain.fps = 8.0
    clips = [uint8_clip(8, 28, 56, seed=s) for s in (5, 6)]
    videos = (torch.stack(clips).float() / 255).requires_grad_(True)
    out = plain(videos, PROMPTS)
    norm = json.load(open(merged / "model_config.json"))["inference_config"]
    n = videoalign_nframes(8, 8.0)
    h, w = smart_resize(28, 56, 28, VS2_MIN_PIXELS, 200704)
    for b, (clip, prompt) in enumerate(zip(clips, PROMPTS)):
        pixels, grid = qwen_reference_pixels(clip, n, (h, w))
        x = torch.tensor([qwen_reference_ids(plain.tokenizer, ref.DETAILED_PROMPT_WITH_SPECIAL_TOKEN.format(text_prompt=prompt), grid)])
        with torch.no_grad():
            hidden = plain.model.model(input_ids=x, mm_token_type_ids=(x == plain.model.config.video_token_id).int() * 2,
                                       pixel_values_videos=pixels, video_grid_thw=grid).last_hidden_state[0]
        special = [plain.tokenizer.convert_tokens_to_ids(t) for t in tiny_models.VIDEOREWARD_TOKENS]
        pooled = hidden[torch.isin(x[0], torch.tensor(special))] @ plain.head.weight.T  # [3, 3] in token order
        raw = pooled.diagonal()
        for i, (dim, key) in enumerate(rewards.VIDEOREWARD_DIMENSIONS.items()):
            want = (raw[i] - norm[f"{key}_mean"]) / norm[f"{key}_std"]
            assert abs(out[dim][b].item() - want.item()) < 2e-3, (dim, out[dim][b].item(), want.item())
    torch.testing.assert_close(out["overall"], out["visual_quality"] + out["motion_quality"] + out["text_alignment"])
    out["overall"].sum().backward()
    assert videos.grad.abs().sum() > 0
    for fmt in ("lora", "full"):  # the release layouts give the same model
        release = rewards.load_reward(f"videoreward@{videoreward_release / fmt}", fps=8.0)
        got = release(videos.detach(), PROMPTS)
        ref_out = rewards.load_reward(f"videoreward@{videoreward_release / fmt / 'merged'}", fps=8.0)(videos.detach(), PROMPTS)
        for k in ("visual_quality", "motion_quality", "text_alignment"):
            torch.testing.assert_close(got[k], ref_out[k], atol=1e-4, rtol=0)


def test_videoreward_converter_command(videoreward_release, tmp_path):
    import os
    import subprocess
    import sys
    out = tmp_path / "converted"
    converter = os.path.join(os.path.dirname(os.path.abspath(rewards.__file__)), "tools", "convert_videoalign.py")
    res = subprocess.run([sys.executable, converter, str(videoreward_release / "full"),
                          str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    a = rewards.load_reward(f"videoreward@{out}", fps=8.0)
    b = rewards.load_reward(f"videoreward@{videoreward_release / 'full' / 'merged'}", fps=8.0)
    videos = torch.rand(1, 6, 3, 28, 28)
    torch.testing.assert_close(a(videos, ["x"])["overall"], b(videos, ["x"])["overall"], atol=1e-4, rtol=0)


# ---- CLIP-based frame rewards ---------------------------------------------------------------------------------------
def clip_reference_pixels(kind, clip, size=28):
    """pickscore/clipscore: transformers' CLIPImageProcessor (PickScore's README loads the laion CLIP-H
    processor; torchmetrics the CLIP one): PIL bicubic shortest side, long side int(), crop offsets floored.
    hpsv2: open_clip's val transform in HPSv2 (ToTensor, then torchvision Resize(BICUBIC) on the float tensor,
    antialiased, no clipping; CenterCrop with rounded offsets). aesthetic: clip.load's _transform (PIL bicubic,
    CenterCrop rounded) as the LAION predictor uses it."""
    mean, std = torch.tensor(rewards.CLIP_MEAN).view(3, 1, 1), torch.tensor(rewards.CLIP_STD).view(3, 1, 1)
    F, _, H, W = clip.shape
    if kind in ("pickscore", "clipscore"):
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
        proc = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                     resample=3, image_mean=rewards.CLIP_MEAN, image_std=rewards.CLIP_STD)
        return proc(pil_frames(clip, range(F)), return_tensors="pt")["pixel_values"]
    h, w = (size, int(size * W / H)) if H <= W else (int(size * H / W), size)  # torchvision _compute_resized_output_size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))  # torchvision center_crop
    if kind == "hpsv2":
        x = torch.nn.functional.interpolate(clip.float() / 255, (h, w), mode="bicubic", antialias=True)
    else:
        from PIL import Image
        x = torch.stack([torch.from_numpy(np.array(im.resize((w, h), Image.BICUBIC))).permute(2, 0, 1)
                         for im in pil_frames(clip, range(F))]).float() / 255
    return (x[:, :, top: top + size, left: left + size] - mean) / std


@pytest.fixture(scope="module")
def clip_folder_aes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip_aes")
    tiny_models.build_clip(str(folder), aesthetic=True)
    return str(folder)


@pytest.mark.parametrize("kind", ["pickscore", "clipscore", "hpsv2", "aesthetic"])
@pytest.mark.parametrize("H,W", SIZE_TABLE)
def test_clip_rewards_preprocess_as_their_reference(clip_folder_aes, kind, H, W):
    r = rewards.load_reward(f"{kind}@{clip_folder_aes}")
    clip = uint8_clip(3, H, W)
    seen = run_captured(r, r.model.vision_model, clip[None].float() / 255, PROMPTS[:1])
    want = clip_reference_pixels(kind, clip)
    tol = 1e-5 if kind == "hpsv2" else 1.01 / 255 / min(rewards.CLIP_STD)  # PIL: 8-bit rounding
    torch.testing.assert_close(seen["pixel_values"], want, atol=tol, rtol=0)


def test_hpsv2_is_the_plain_cosine_and_clipscore_clamps_the_mean(clip_folder_aes):
    """HPSv2 img_score.py: logits_per_image = image_features @ text_features.T (both normalised): no logit
    scale. torchmetrics clip_score: max(mean(100 * cos), 0) over the (frame, caption) pairs."""
    hps = rewards.load_reward(f"hpsv2@{clip_folder_aes}")
    videos = torch.rand(2, 3, 3, 28, 28, requires_grad=True)
    out = hps(videos, PROMPTS)
    img = hps.embed_frames(videos.detach())
    with torch.no_grad():
        tok = hps.tokenizer(PROMPTS, padding=True, return_tensors="pt")
        txt = torch.nn.functional.normalize(hps.model.get_text_features(**tok).pooler_output, dim=-1)
    cos = (img * txt[:, None]).sum(-1)
    assert hps.model.logit_scale.exp().item() > 10  # the scale is there, the reference does not use it
    torch.testing.assert_close(out["reward"], cos.mean(1), atol=1e-5, rtol=0)
    out["reward"].sum().backward()
    assert videos.grad.abs().sum() > 0
    clip = rewards.load_reward(f"clipscore@{clip_folder_aes}")(videos.detach(), PROMPTS)["reward"]
    torch.testing.assert_close(clip, (100 * cos).mean(1).clamp(min=0), atol=1e-4, rtol=0)


# ---- VideoMAE (VADER's action reward) -----------------------------------------------------------------------------
@pytest.mark.parametrize("F,want_frames", [(16, 16), (81, 16), (9, 8), (5, 4)])
def test_videomae_uses_the_decoded_frames_without_repeats(tmp_path, F, want_frames):
    """VADER (Core/actpred_scorer.py) builds VideoMAE with num_frames = the decoded frame count, so no frame is
    repeated; pixels follow the checkpoint's VideoMAEImageProcessor (shortest side, centre crop, bilinear)."""
    from transformers import VideoMAEForVideoClassification
    from transformers.models.videomae.image_processing_pil_videomae import VideoMAEImageProcessorPil
    import json
    tiny_models.build_videomae(str(tmp_path), num_frames=16)
    r = rewards.load_reward(f"videomae:juggling_balls@{tmp_path}")
    clip = uint8_clip(F, 40, 72)
    videos = (clip[None].float() / 255).requires_grad_(True)
    seen = capture(r.model, stop=False)
    out = r(videos, ["x"])
    pixels = seen[0]["pixel_values"]
    assert pixels.shape[1] == want_frames
    assert all(not torch.equal(pixels[0, i], pixels[0, i + 1]) for i in range(want_frames - 1))  # no repeats
    idx = rewards.frame_indices(F, want_frames)
    cfg = {k: v for k, v in json.load(open(tmp_path / "preprocessor_config.json")).items() if k != "image_processor_type"}
    want = VideoMAEImageProcessorPil(**cfg)(pil_frames(clip, idx.tolist()), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels.detach(), want, atol=1.01 / 255 / 0.224, rtol=0)
    vader = VideoMAEForVideoClassification.from_pretrained(str(tmp_path), num_frames=want_frames).eval()
    with torch.no_grad():
        p = torch.softmax(vader(pixel_values=want).logits, -1)[0, 1]
    assert abs(out["reward"].item() - p.item()) < 1e-3
    out["reward"].sum().backward()
    assert videos.grad.abs().sum() > 0


# ---- V-JEPA 2 -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("H,W", SIZE_TABLE)
def test_vjepa2_pixels_match_its_video_processor(tmp_path, H, W):
    """VJEPA2VideoProcessor: shortest side to int(crop * 256 / 224), bilinear antialiased on the uint8 frames,
    centre crop (offsets truncated), ImageNet normalisation; frames without repeats."""
    tiny_models.build_vjepa2(str(tmp_path))
    r = rewards.load_reward(f"vjepa2@{tmp_path}")
    clip = uint8_clip(8, H, W)
    seen = run_captured(r, r.model, clip[None].float() / 255, ["x"])
    short, crop = int(32 * 256 / 224), 32
    h, w = (short, int(short * W / H)) if H <= W else (int(short * H / W), short)
    x = torch.nn.functional.interpolate(clip.float(), (h, w), mode="bilinear", antialias=True).round().clamp(0, 255)
    top, left = int((h - crop) / 2.0), int((w - crop) / 2.0)
    x = x[:, :, top: top + crop, left: left + crop] / 255
    want = (x - torch.tensor(rewards.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(rewards.IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(seen["pixel_values_videos"][0], want, atol=0.51 / 255 / 0.224, rtol=0)
    assert rewards.load_reward(f"vjepa2@{tmp_path}").frame_count(5) == 4  # no repeated frame in a short clip
