"""Our reward models' inputs against their reference inference code, on the same frames (REWARDS_REFERENCE.md
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
