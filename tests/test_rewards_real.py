"""Real reward models, loaded from tiny random checkpoints through the production from_pretrained path."""
import pytest
import torch

import rewards


def test_videoscore_loads_and_scores(videoscore_folder):
    folder, base, head = videoscore_folder
    r = rewards.load_reward(f"videoscore:dynamic_degree@{folder}")
    assert r.name == "videoscore:dynamic_degree" and r.differentiable
    videos = torch.rand(2, 9, 3, 16, 16)
    out = r(videos, ["a red square falling", "a cat"])
    assert set(rewards.VIDEOSCORE_DIMENSIONS) <= set(out) and out["reward"].shape == (2,)
    assert torch.equal(out["reward"], out["dynamic_degree"])
    assert torch.equal(r.head.weight, head)  # the head came from the checkpoint, by name
    assert all(torch.equal(a, b) for a, b in zip(r.model.state_dict().values(), base.state_dict().values()))
    other = r(torch.rand(2, 9, 3, 16, 16), ["a red square falling", "a cat"])
    assert not torch.allclose(out["reward"], other["reward"])  # the video matters


def test_videoscore_gradient_reaches_the_pixels_and_patches(videoscore_folder):
    r = rewards.load_reward(f"videoscore@{videoscore_folder[0]}")
    videos = torch.rand(1, 4, 3, 16, 16, requires_grad=True)
    r(videos, ["a red square falling"])["reward"].sum().backward()
    assert videos.grad is not None and videos.grad.abs().sum() > 0
    assert r.patch_scores(videos.detach(), ["x"], (1, 2, 2)).shape == (1, 1, 2, 2)


def test_videoscore_errors(videoscore_folder, tmp_path):
    with pytest.raises(ValueError, match="unknown videoscore dimension 'beauty'"):
        rewards.parse_reward_spec("videoscore:beauty")
    with pytest.raises(FileNotFoundError, match="pass a local folder"):
        rewards.load_reward(f"videoscore@{tmp_path}/nothing-here")


def test_vlm_judge_p_yes(qwen_vl_folder):
    judge = rewards.load_reward(f"vlm@{qwen_vl_folder}")
    assert judge.name == "vlm:yes"
    videos = torch.rand(2, 8, 3, 32, 40, requires_grad=True)
    out = judge(videos, ["a red square falling", "a blue circle pushing a green square"])
    assert out["p_yes"].shape == (2,) and ((out["p_yes"] > 0) & (out["p_yes"] < 1)).all()
    assert set(out["reward"].tolist()) <= {0.0, 1.0} and torch.equal(out["yes"], (out["p_yes"] > 0.5).float())
    out["p_yes"].sum().backward()  # P(yes) is differentiable: the frames were prepared in torch
    assert videos.grad.abs().sum() > 0
    pixels, grid, n = judge.video_inputs(torch.rand(1, 5, 3, 30, 60))
    assert grid.tolist() == [[3, 2, 4]] and n == 3 * 2 * 4 // 4 and pixels.shape == (24, 3 * 2 * 14 * 14)
    with pytest.raises(ValueError, match="unknown vlm dimension 'gpt5'"):
        rewards.parse_reward_spec("vlm:gpt5")


def test_clip_frame_rewards(tmp_path):
    import tiny_models
    model = tiny_models.build_clip(str(tmp_path / "clip"), aesthetic=True)
    videos = torch.rand(2, 3, 3, 20, 36, requires_grad=True)
    prompts = ["a red square falling", "a cat"]
    pick = rewards.load_reward(f"pickscore@{tmp_path / 'clip'}")
    out = pick(videos, prompts)
    # by hand: CLIP preprocessing (shortest side 28, centre crop), logit_scale * cosine, mean over frames
    x = rewards.resize_center_crop(videos.detach(), 28, rewards.CLIP_MEAN, rewards.CLIP_STD)
    assert x.shape == (2, 3, 3, 28, 28)
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.get_image_features(pixel_values=x.flatten(0, 1)).pooler_output, dim=-1)
        tok = pick.tokenizer(prompts, padding=True, return_tensors="pt")
        txt = torch.nn.functional.normalize(model.get_text_features(**tok).pooler_output, dim=-1)
    want = (model.logit_scale.exp() * (img.view(2, 3, -1) * txt[:, None]).sum(-1)).mean(1)
    assert torch.allclose(out["reward"], want, atol=1e-5)
    out["reward"].sum().backward()
    assert videos.grad.abs().sum() > 0  # differentiable, for VADER
    clip = rewards.load_reward(f"clipscore@{tmp_path / 'clip'}")(videos.detach(), prompts)["reward"]
    assert torch.allclose(clip, (100 * ((img.view(2, 3, -1) * txt[:, None]).sum(-1)).clamp(min=0)).mean(1), atol=1e-4)
    aes = rewards.load_reward(f"aesthetic:random@{tmp_path / 'clip'}")
    assert aes(videos.detach(), prompts)["reward"].shape == (2,) and aes.mlp is not None
    both = rewards.load_reward(f"pickscore@{tmp_path / 'clip'}*0.5+toy:quality")
    assert both.differentiable


def test_vader_with_a_real_frame_reward_end_to_end(tmp_path, tiny_folders):
    import json
    import os

    import tiny_models
    import vader_grad
    from helpers import run_main
    tiny_models.build_clip(str(tmp_path / "clip"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat playing piano\na dog surfing\n")
    out = run_main(vader_grad, ["--model", tiny_folders["wan"], "--reward", f"pickscore:random@{tmp_path / 'clip'}",
                                "--prompts", str(prompts), "--eval-prompts", str(prompts), "--num-frames", "9",
                                "--height", "16", "--width", "16", "--steps", "2", "--batch-size", "2",
                                "--sample-steps", "2", "--lora-rank", "4", "--diversity-prompts", "1",
                                "--diversity-seeds", "2", "--decode-frames", "alternate", "--out", str(tmp_path / "v")])
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert rows[-1]["eval"] and "eval/pickscore" in rows[0] and rows[1]["grad_norm"] > 0
