"""vader_grad.py: gradient only through the last K steps, frame subsampling, ReFL, outputs, torchrun, resume."""
import json
import os

import pytest
import torch

import common
import distributed
import models
import toy_world
import vader_grad
from helpers import assert_ranks_agree_with_one_process, final_params, max_diff, run_main

FAST = ["--batch-size", "2", "--sample-steps", "3", "--num-eval-prompts", "2", "--diversity-prompts", "2",
        "--diversity-seeds", "2", "--lora-rank", "4", "--eval-every", "99"]


@pytest.mark.parametrize("mode,k,want", [("last", 1, [False, False, True]), ("last", 2, [False, True, True]),
                                         ("specific", None, [False, True, True])])
def test_only_the_last_k_sampler_steps_carry_gradient(tmp_path, monkeypatch, toy_model, mode, k, want):
    calls = []
    real_denoise = models.VideoModel.denoise
    monkeypatch.setattr(models.VideoModel, "denoise", lambda *a, **kw: calls.append(torch.is_grad_enabled()) or real_denoise(*a, **kw))
    grads_seen = []
    real_avg = distributed.average_gradients

    def check_grads(params, d):
        grads_seen.append(all(p.grad is not None for p in params))
        return real_avg(params, d)

    monkeypatch.setattr(distributed, "average_gradients", check_grads)
    extra = ["--backprop-mode", mode] + (["--backprop-steps", str(k)] if k else ["--backprop-start", "1"])
    # (checkpointing would call denoise again in backward: off here, so the calls are countable)
    run_main(vader_grad, FAST + extra + ["--steps", "1", "--no-grad-checkpointing", "--out", str(tmp_path / "r")])
    n_eval_calls = 2 * 3  # step-0 evaluation: held-out and diversity batches, 3 sampler steps each, no grad
    assert not any(calls[:n_eval_calls])
    assert calls[n_eval_calls: n_eval_calls + 3] == want  # the training sample: grad exactly in the last steps
    assert grads_seen == [True]  # every trainable weight received a gradient


@pytest.mark.parametrize("fsdp", [False, True])
def test_under_fsdp_grad_carrying_steps_checkpoint_per_block_only(tmp_path, monkeypatch, toy_model, fsdp):
    """A whole sharded denoiser call recomputed inside the backward gathers every block's weights at once (the
    memory plan: +26 GiB per rank for Wan 14B), so under --fsdp the sampler checkpoints per block only."""
    calls, checkpoint = [], torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                        lambda fn, *a, **k: calls.append(getattr(fn, "__name__", "")) or checkpoint(fn, *a, **k))
    run_main(vader_grad, FAST + ["--steps", "1", "--out", str(tmp_path / "r")] + ["--fsdp"] * fsdp)
    per_call = calls.count("denoise")
    assert per_call == (0 if fsdp else 1) and len(calls) > per_call  # (and the blocks checkpoint in both)


def test_frame_subsampling_decodes_only_those_frames(tmp_path, monkeypatch, toy_model):
    shapes = []
    real = toy_world.ToyReward.__call__
    monkeypatch.setattr(toy_world.ToyReward, "__call__", lambda self, v, p: shapes.append(v.shape[1]) or real(self, v, p))
    for mode, frames in (("one", 1), ("alternate", 4), ("all", 8)):
        shapes.clear()
        run_main(vader_grad, FAST + ["--steps", "1", "--decode-frames", mode, "--out", str(tmp_path / mode),
                                     "--reward", "toy:text"])
        assert shapes[1] == frames  # shapes[0] is the step-0 evaluation on full videos


def test_refl_and_vader_end_to_end(tmp_path, toy_model):
    for name, extra in (("vader", []), ("refl", ["--refl"])):
        out = run_main(vader_grad, FAST + extra + ["--steps", "2", "--out", str(tmp_path / name)])
        rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
        train = [r for r in rows if not r.get("eval")]
        for k in ("reward_mean", "loss", "grad_norm", "sec_per_step", "peak_mem_gb"):
            assert k in train[0]
        assert "eval/diversity" in rows[0] and "eval/text_alignment" in rows[0] and rows[-1]["eval"]
        assert 0 <= rows[0]["eval/color_accuracy"] <= 1  # the toy's colour accuracy, as the DPO scripts log it
        assert common.latest_checkpoint(out).endswith("step-000002")


def test_reward_target_and_bad_input(tmp_path, toy_model):
    out = run_main(vader_grad, FAST + ["--steps", "1", "--reward-target", "1.0", "--out", str(tmp_path / "t")])
    row = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))][1]
    assert abs(row["loss"] - (1.0 - row["reward_mean"])) < 1e-5  # |target - R| with R <= 1
    with pytest.raises(ValueError, match="not differentiable"):
        run_main(vader_grad, FAST + ["--reward", "judge", "--out", str(tmp_path / "j")])
    with pytest.raises(ValueError, match="needs --backprop-start"):
        run_main(vader_grad, ["--backprop-mode", "specific", "--out", str(tmp_path / "s")])
    with pytest.raises(ValueError, match="truncates Wan's causal VAE decoder"):
        run_main(vader_grad, ["--decoder-grad", "own", "--out", str(tmp_path / "o")])
    assert not os.path.exists(tmp_path / "o")  # refused before anything was written


def test_resume_equals_an_uninterrupted_run(tmp_path, toy_model):
    run_main(vader_grad, FAST + ["--steps", "4", "--out", str(tmp_path / "full"), "--save-every", "2"])
    run_main(vader_grad, FAST + ["--steps", "2", "--out", str(tmp_path / "part")])
    run_main(vader_grad, FAST + ["--steps", "4", "--out", str(tmp_path / "part"), "--resume", str(tmp_path / "part")])
    assert max_diff(final_params(str(tmp_path / "full")), final_params(str(tmp_path / "part"))) < 1e-6


def test_torchrun_two_ranks(tmp_path, toy_model):
    args = FAST + ["--steps", "2"]
    assert_ranks_agree_with_one_process("vader_grad", args, tmp_path)
