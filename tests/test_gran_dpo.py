"""gran_dpo.py: patch masks, the patch loss by hand, reduction to video DPO, outputs, resume (torchrun: tests/test_regime.py)."""
import json
import math

import pytest
import torch

import gran_dpo
import online_vpo
from helpers import final_params, max_diff, run_main

FAST = ["--batch-size", "2", "--num-candidates", "2", "--sample-steps", "2", "--num-eval-prompts", "2",
        "--lora-rank", "4", "--min-margin", "0", "--eval-every", "99", "--heldout-pairs", "0"]  # (test_dpo_levers.py)


@pytest.mark.parametrize("shape,grid", [((8, 32, 32), (2, 4, 4)), ((3, 5, 7), (2, 2, 3)), ((4, 4, 4), (1, 1, 1))])
def test_patch_masks_tile_the_latent_exactly_once(shape, grid):
    m = gran_dpo.patch_masks(shape, grid)
    assert m.shape == (grid[0] * grid[1] * grid[2], *shape)
    assert torch.equal(m.sum(0), torch.ones(shape))  # every element in exactly one patch
    assert (m.sum((1, 2, 3)) > 0).all()  # no empty patch


def test_patch_errors_are_means_over_each_mask():
    pred, target = torch.zeros(1, 2, 2, 2, 2), torch.zeros(1, 2, 2, 2, 2)
    target[0, :, :, 0, 0] = 2.0  # squared error 4 at spatial cell (0, 0) of every frame and channel
    e = gran_dpo.patch_errors(pred, target, gran_dpo.patch_masks((2, 2, 2), (1, 2, 2)), channel_dim=1)
    assert torch.allclose(e, torch.tensor([[4.0, 0.0, 0.0, 0.0]]))


def test_patch_loss_equals_hand_computed_value():
    e_w, e_l = torch.tensor([[0.2, 0.4, 0.1]]), torch.tensor([[0.3, 0.1, 0.1]])
    r_w, r_l = torch.tensor([[0.25, 0.3, 0.1]]), torch.tensor([[0.25, 0.2, 0.1]])
    sign = torch.tensor([[1.0, -1.0, 0.0]])  # patch 2 is a tie: dropped
    loss, inside = gran_dpo.patch_dpo_loss(e_w, e_l, r_w, r_l, sign, beta=10.0)
    # patch 0: +1 * [(0.2-0.25) - (0.3-0.25)] = -0.10 -> inside = -5 * -0.10 = 0.5
    # patch 1: -1 * [(0.4-0.3) - (0.1-0.2)]   = -0.20 -> inside = -5 * -0.20 = 1.0
    assert torch.allclose(inside[0, :2], torch.tensor([0.5, 1.0]))
    want = (math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(-1.0))) / 2
    assert torch.allclose(loss, torch.tensor([want]), atol=1e-6)
    w_loss, _ = gran_dpo.patch_dpo_loss(e_w, e_l, r_w, r_l, sign, 10.0, weight=torch.tensor([[2.0, 0.0, 1.0]]))
    assert torch.allclose(w_loss, torch.tensor([math.log(1 + math.exp(-0.5))]), atol=1e-6)


def test_patch_weight_zero_is_exactly_video_dpo(tmp_path, toy_model):
    args = FAST + ["--steps", "2", "--reward", "toy:quality", "--lr", "3e-4"]
    run_main(gran_dpo, args + ["--patch-weight", "0", "--out", str(tmp_path / "g")])
    run_main(online_vpo, args + ["--recipe", "paper", "--out", str(tmp_path / "o")])  # (gran_dpo has no recipe)
    assert max_diff(final_params(str(tmp_path / "g")), final_params(str(tmp_path / "o"))) == 0.0
    run_main(gran_dpo, args + ["--patch-weight", "1", "--out", str(tmp_path / "g1")])
    assert max_diff(final_params(str(tmp_path / "g1")), final_params(str(tmp_path / "o"))) > 0  # the term acts


def test_end_to_end_outputs_and_resume(tmp_path, toy_model):
    run_main(gran_dpo, FAST + ["--steps", "4", "--out", str(tmp_path / "full"), "--save-every", "2"])
    rows = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    train = [r for r in rows if not r.get("eval")]
    for k in ("video_loss", "patch_loss", "patch_acc", "patch_disagree", "implicit_acc"):
        assert k in train[0]
    assert "eval/defective_patches" in rows[0] and rows[-1]["eval"]
    run_main(gran_dpo, FAST + ["--steps", "2", "--out", str(tmp_path / "part")])
    run_main(gran_dpo, FAST + ["--steps", "4", "--out", str(tmp_path / "part"), "--resume", str(tmp_path / "part")])
    assert max_diff(final_params(str(tmp_path / "full")), final_params(str(tmp_path / "part"))) < 1e-6


def test_bad_grid_and_reward_without_patches(tmp_path):
    with pytest.raises(ValueError, match="--patch-grid"):
        run_main(gran_dpo, ["--patch-grid", "4,4", "--out", str(tmp_path / "a")])
