"""flow_grpo.py: the SDE sampler, the log-probabilities, the group advantages, the clipped objective and its
direction, and the script end to end (resume included)."""
import json
import math
import os

import pytest
import torch

import common
import flow_grpo
from helpers import assert_ranks_agree_with_one_process, run_main

FAST = ["--batch-size", "2", "--group-size", "2", "--sample-steps", "3", "--num-eval-prompts", "2",
        "--lora-rank", "4", "--sample-batch-size", "2", "--eval-every", "99"]
PROMPTS = ["a red square moving left", "a blue circle falling"]


def video_kw(steps=4):
    return dict(num_frames=8, height=32, width=32, steps=steps, guidance=3.0)


def test_sde_with_noise_zero_is_the_ode_sampler(toy_model):
    """a = 0 on every step is the Euler ODE, hence common.sample (tested against the stock pipeline) exactly."""
    seeds = [11, 12]
    ode, _ = common.sample(toy_model, PROMPTS, seeds, **video_kw())
    sde = flow_grpo.sde_sample(toy_model, PROMPTS, seeds, video_kw(), window=[], noise_level=0.7)
    assert torch.allclose(sde["latents"], ode, atol=1e-6), (sde["latents"] - ode).abs().max()
    noisy = flow_grpo.sde_sample(toy_model, PROMPTS, seeds, video_kw(), window=[0, 1], noise_level=0.7)
    assert (noisy["latents"] - ode).abs().max() > 1e-2  # the window's noise does change the video
    # one step, a = 0: the scheduler's own Euler step
    x, v = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    assert torch.equal(flow_grpo.sde_step(x, v, 0.8, 0.6, 0.0, 0.9)[0], x + v * (0.6 - 0.8))


def test_a_group_shares_its_initial_noise_and_differs_only_by_the_window(toy_model):
    """--same-noise (DanceGRPO's use_same_noise): videos of one group start from one noise, so with the ODE
    everywhere they are identical and with an SDE window they differ by the window's noise alone; without it
    (init_seeds None) each video's seed draws its own initial noise, as before."""
    prompts, seeds, init = PROMPTS[:1] * 2, [21, 22], [7, 7]
    ode = flow_grpo.sde_sample(toy_model, prompts, seeds, video_kw(), window=[], noise_level=0.7, init_seeds=init)
    assert torch.equal(ode["latents"][0], ode["latents"][1])
    alone, _ = common.sample(toy_model, prompts, init, **video_kw())  # the group's noise is seed 7's
    assert torch.allclose(ode["latents"], alone, atol=1e-6)
    sde = flow_grpo.sde_sample(toy_model, prompts, seeds, video_kw(), window=[0], noise_level=0.7, init_seeds=init)
    assert torch.equal(sde["x"][0, 0], sde["x"][1, 0])  # the same state entering the window
    assert (sde["latents"][0] - sde["latents"][1]).abs().max() > 1e-2  # and different videos leaving it
    own = flow_grpo.sde_sample(toy_model, prompts, seeds, video_kw(), window=[0], noise_level=0.7)
    assert (own["x"][0, 0] - own["x"][1, 0]).abs().max() > 1e-2


def test_logprob_is_the_gaussian_density_and_the_step_its_mean():
    g = torch.Generator().manual_seed(0)
    x, v, noise = (torch.randn(3, 2, 5, generator=g) for _ in range(3))
    sigma, sigma_next, a = 0.7, 0.5, 0.7
    x_next, mean, std = flow_grpo.sde_step(x, v, sigma, sigma_next, a, 0.9, noise)
    dt, std_t = sigma_next - sigma, a * math.sqrt(sigma / (1 - sigma))  # Flow-GRPO's SDE, by hand
    want_mean = x * (1 + std_t ** 2 / (2 * sigma) * dt) + v * (1 + std_t ** 2 * (1 - sigma) / (2 * sigma)) * dt
    assert torch.allclose(mean, want_mean) and math.isclose(std, std_t * math.sqrt(-dt))
    assert torch.allclose(x_next, want_mean + std * noise)
    want = torch.distributions.Normal(mean, std).log_prob(x_next).flatten(1).mean(1)
    assert torch.allclose(flow_grpo.sde_logprob(x_next, mean, std), want, atol=1e-5)
    # at sigma = 1 the std uses the next sigma in its denominator (Flow-GRPO), instead of dividing by 0
    assert math.isfinite(flow_grpo.sde_step(x, v, 1.0, 0.9, a, 0.9, noise)[2])


def test_group_advantages_by_hand_and_an_equal_group_drops_out():
    r = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0], [0.0, 10.0, 0.0]])
    adv, dropped = flow_grpo.group_advantages(r, clip=1.3)
    s = math.sqrt(2 / 3)
    assert torch.allclose(adv[0], torch.tensor([-1 / (s + 1e-4), 0.0, 1 / (s + 1e-4)]))
    assert torch.equal(adv[1], torch.zeros(3)) and dropped.tolist() == [False, True, False]
    assert adv[2].tolist() == pytest.approx([-0.7071, 1.3, -0.7071], abs=1e-3)  # 1.414 clipped to 1.3
    logp = torch.randn(3, requires_grad=True)
    loss, _ = flow_grpo.grpo_loss(logp, logp.detach(), adv[1], 1e-4)
    assert torch.equal(torch.autograd.grad(loss.sum(), logp)[0], torch.zeros(3))  # equal rewards: no gradient


def test_at_ratio_one_the_clipped_and_unclipped_objectives_agree_and_outside_the_range_clipping_bites():
    adv = torch.tensor([1.0, -2.0])
    logp = torch.tensor([0.3, -0.1], requires_grad=True)
    loss, ratio = flow_grpo.grpo_loss(logp, logp.detach(), adv, 0.2)
    assert torch.equal(ratio, torch.ones(2)) and torch.equal(loss, -adv)
    assert torch.equal(torch.autograd.grad(loss.sum(), logp)[0], -adv)  # d(-A ratio)/d logp = -A at ratio 1
    far = logp.detach() + torch.tensor([1.0, -1.0])  # ratio e (> 1 + c) for a positive A, 1/e for a negative one
    loss, _ = flow_grpo.grpo_loss(far.requires_grad_(), logp.detach(), adv, 0.2)
    assert torch.allclose(loss, torch.tensor([-1.2, 2.0 * 0.8]))  # clipped: no incentive to go further


def test_one_update_moves_the_policy_toward_the_higher_reward_video():
    """A fixed group of two SDE videos of one prompt, rewards (1, 0): after one gradient step on the GRPO loss the
    winner's transitions become more likely relative to the loser's (a sign flip in the objective fails this)."""
    import models
    model = models.load_model("toy")  # (its own copy: the LoRA goes into it)
    params = common.setup_trainable(model, 4)
    torch.manual_seed(0)
    for q in params:  # (LoRA's B starts at 0, where lora_A gets no gradient: start both away from it)
        q.data.normal_(0, 0.02)
    kw, window = video_kw(steps=4), [0, 1, 2]
    roll = flow_grpo.sde_sample(model, PROMPTS[:1] * 2, [5, 6], kw, window, 0.7)
    emb, mask = model.encode_prompts(PROMPTS[:1] * 2)
    nemb, nmask = model.encode_prompts(["", ""])
    adv, _ = flow_grpo.group_advantages(torch.tensor([[1.0, 0.0]]), 5.0)

    def logps():
        return torch.stack([flow_grpo.transition(model, roll["x"][:, w], roll["x_next"][:, w], i, roll["timesteps"],
                                                 roll["sigmas"], 0.7, emb, mask, nemb, nmask, 3.0)[0]
                            for w, i in enumerate(window)], 1)

    before = logps()
    assert torch.allclose(before, roll["logp"], atol=1e-5)  # the recomputed log-prob is the sampler's
    loss, _ = flow_grpo.grpo_loss(before, roll["logp"], adv.flatten()[:, None], 1e-4)
    loss.mean().backward()
    with torch.no_grad():
        for q in params:
            q -= 0.5 * q.grad / (q.grad.norm() + 1e-12)  # a normalised gradient step
            q.grad = None
        after = logps()
    gain = (after - before).sum(1)
    assert gain[0] > gain[1], gain.tolist()


def test_flow_grpo_trains_and_logs(tmp_path):
    out = run_main(flow_grpo, FAST + ["--steps", "2", "--ema", "--sde-window", "0:2", "--out", str(tmp_path / "r")])
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    train = [r for r in rows if not r.get("eval")]
    assert [r["step"] for r in train] == [1, 2]
    assert train[0]["ratio_mean"] == 1.0 and train[0]["clip_frac"] == 0.0  # the first update: pi_theta = pi_old
    assert all(math.isfinite(r["loss"]) and r["groups_dropped"] in (0, 1, 2) for r in train)
    assert rows[-1]["eval"] and "eval/color_accuracy" in rows[-1]
    assert os.path.exists(os.path.join(common.latest_checkpoint(out), "lora", "README.md"))


def test_minibatches_take_one_optimizer_step_per_share_of_the_groups(tmp_path, monkeypatch):
    """--minibatches 2 with two groups: two Adam steps per rollout batch, each on ONE group's videos (the first
    minibatch's and the second's disjoint), the second's ratio no longer 1 (the policy moved). (The default, one
    step with ratio 1: test_flow_grpo_trains_and_logs.)"""
    seen, real = [], flow_grpo.transition
    monkeypatch.setattr(flow_grpo, "transition", lambda model, x, x_next, *a: seen.append(x_next.clone()) or
                        real(model, x, x_next, *a))
    out = run_main(flow_grpo, FAST + ["--steps", "1", "--minibatches", "2", "--sde-window", "0:2", "--kl-beta", "0",
                                      "--out", str(tmp_path / "r")])
    assert [len(x) for x in seen] == [2] * 4  # (minibatch, window step): one group of G = 2 each
    assert not any(torch.equal(a, b) for a in seen[0] for b in seen[2])  # step 0 of minibatch 0 vs minibatch 1
    state = torch.load(os.path.join(common.latest_checkpoint(out), "state.pt"), weights_only=False)
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {2}
    row = next(json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"eval"' not in line)
    assert row["ratio_mean"] != 1.0


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_torchrun_two_ranks_equal_one_process(tmp_path, precision):
    """torchrun 2 ranks, one group (prompt) each, == one process holding both groups: weights, and each update's
    gradient after the cross-rank average (KL term on, 2 inner epochs: the second's ratio is no longer 1). bf16:
    the same numerics on both sides, and a signal above bf16's rounding (a loss that rounds to zero would give
    a zero gradient on both and pass the comparison: the gradient's scale is asserted > 0 in the helper)."""
    args = FAST + ["--steps", "1", "--inner-epochs", "2", "--sde-window", "0:2", "--kl-beta", "0.5",
                   "--mixed-precision", precision]
    if precision == "no":  # two groups per rank in two minibatches: minibatch m is groups m and m + 2 on both sides
        args += ["--batch-size", "4", "--minibatches", "2"]
    assert_ranks_agree_with_one_process("flow_grpo", args, tmp_path, tol=1e-4 if precision == "no" else 2e-3,
                                        grad_rtol=1e-4 if precision == "no" else 0.15)  # (1.1e-5 measured)
    rows = [json.loads(line) for line in open(tmp_path / "ddp" / "metrics.jsonl") if '"eval"' not in line]
    assert rows[0]["grad_norm"] > 0 and rows[0]["kl"] > 0  # (the later updates see a policy that moved)


def test_resume_equals_an_uninterrupted_run(tmp_path):
    args = FAST + ["--sde-window", "1:3", "--save-every", "1"]
    full = run_main(flow_grpo, args + ["--steps", "2", "--out", str(tmp_path / "full")])
    half = run_main(flow_grpo, args + ["--steps", "1", "--out", str(tmp_path / "half")])
    resumed = run_main(flow_grpo, ["--resume", half, "--steps", "2"])
    rows = [[{k: v for k, v in json.loads(line).items() if "sec" not in k and "per_s" not in k}
             for line in open(os.path.join(o, "metrics.jsonl"))] for o in (full, resumed)]
    train = [[r for r in rs if not r.get("eval")] for rs in rows]
    assert train[0] == train[1] and len(train[0]) == 2 and rows[0][-1] == rows[1][-1]  # (+ the half run's end eval)
    from safetensors.torch import load_file
    loras = [load_file(os.path.join(common.latest_checkpoint(o), "lora", "pytorch_lora_weights.safetensors"))
             for o in (full, resumed)]
    assert all(torch.equal(loras[0][k], loras[1][k]) for k in loras[0])


@pytest.mark.parametrize("argv,match", [(["--group-size", "1"], "--group-size 1"),
                                        (["--sde-window", "2:9"], "--sde-window 2:9"),
                                        (["--sde-noise", "0"], "--sde-noise 0"),
                                        (["--train-timestep-fraction", "1.5"], "--train-timestep-fraction")])
def test_bad_input_is_refused_before_loading(argv, match, monkeypatch, tmp_path):
    import models

    def refuse(*a, **k):
        raise AssertionError("the model started loading")
    monkeypatch.setattr(models, "load_model", refuse)
    with pytest.raises(ValueError, match=match):
        run_main(flow_grpo, FAST + argv + ["--out", str(tmp_path / "r")])


def test_a_family_without_a_flow_sampler_is_refused_before_loading(tiny_folders, monkeypatch, tmp_path):
    import models
    monkeypatch.setattr(models, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    with pytest.raises(ValueError, match="does not sample a flow"):
        run_main(flow_grpo, FAST + ["--model", tiny_folders["cogvideox"], "--out", str(tmp_path / "r")])
