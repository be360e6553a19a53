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
