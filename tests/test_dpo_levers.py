"""Issue #30's DPO levers: aligned candidates (--branch-at), K (t, eps) draws, every pair, logit-normal
timesteps, several evaluation seeds, and the implicit accuracy on fresh held-out pairs."""
import json
import os

import pytest
import torch

import common
import distributed
import models
import online_vpo
from helpers import assert_ranks_agree_with_one_process, final_params, max_diff, run_main

FAST = ["--batch-size", "2", "--num-candidates", "2", "--sample-steps", "2", "--num-eval-prompts", "2",
        "--lora-rank", "4", "--min-margin", "0", "--heldout-pairs", "0", "--save-every", "99", "--eval-every", "99",
        "--recipe", "paper"]  # (each lever is tested alone; the toy recipe's defaults at the end of this file)
PROMPT = "a red square moving right"


def spy_denoiser(monkeypatch):
    """Record every sampler call's input latents and guided velocity."""
    calls = []
    real = models.VideoModel.denoise

    def spy(model, x, t, emb, mask=None):
        out = real(model, x, t, emb, mask)
        calls.append((x.detach().clone(), t.detach().clone(), out.detach().clone()))
        return out
    monkeypatch.setattr(models.VideoModel, "denoise", spy)
    return calls


def test_aligned_candidates_share_the_trajectory_up_to_the_branch(monkeypatch, toy_model):
    model, b = toy_model, 2
    calls = spy_denoiser(monkeypatch)
    lat, _ = common.sample(model, [PROMPT] * 2, [7, 7], 4, 16, 16, steps=5, guidance=3.0, branch_at=b,
                           branch_seeds=[101, 202])
    xs = [x.chunk(2)[1] for x, _, _ in calls]  # [uncond; cond] batched: the cond half is the latents
    for i in range(b + 1):  # steps 0..b see the same input: one initial noise, a deterministic ODE
        assert torch.equal(xs[i][0], xs[i][1]), i
    assert (xs[b + 1][0] - xs[b + 1][1]).abs().max() > 0.1  # after step b each candidate has its own noise
    assert (lat[0] - lat[1]).abs().max() > 0.01
    # the branch by hand: x_{b+1} = (1 - s_{b+1}) x0_hat + s_{b+1} eps_j, with x0_hat = x_b - s_b v (Euler flow)
    sig = model.scheduler.sigmas
    x_b, (uncond, cond) = xs[b], calls[b][2].float().chunk(2)
    v = uncond + 3.0 * (cond - uncond)
    x0_hat = x_b - sig[b] * v
    for j, seed in enumerate([101, 202]):
        eps = torch.randn((1, *x_b.shape[1:]), generator=torch.Generator().manual_seed(seed))[0]
        want = (1 - sig[b + 1]) * x0_hat[j] + sig[b + 1] * eps
        assert torch.allclose(xs[b + 1][j], want, atol=1e-5)


def test_without_branch_the_sampler_is_unchanged(toy_model):
    a, _ = common.sample(toy_model, [PROMPT] * 2, [7, 8], 4, 16, 16, steps=4, guidance=3.0)
    b, _ = common.sample(toy_model, [PROMPT] * 2, [7, 8], 4, 16, 16, steps=4, guidance=3.0, branch_at=None,
                         branch_seeds=[1, 2])
    assert torch.equal(a, b)  # (the stock pipeline comparisons in test_common/test_families pin the rest)


def test_online_vpo_branch_flag_gives_candidates_one_noise_per_prompt(tmp_path, monkeypatch, toy_model):
    seen = []
    real = common.sample

    def spy(model, prompts, seeds, *a, **k):
        seen.append((list(prompts), list(seeds), k.get("branch_seeds"), k.get("branch_at")))
        return real(model, prompts, seeds, *a, **k)
    monkeypatch.setattr(common, "sample", spy)
    run_main(online_vpo, FAST + ["--steps", "1", "--branch-at", "0", "--out", str(tmp_path / "r")])
    train = [s for s in seen if s[3] == 0]  # (the evaluation never branches)
    assert train and all(s[3] is None for s in seen if s not in train)
    prompts, seeds, branch, _ = train[0]
    assert seeds[0] == seeds[1] and seeds[2] == seeds[3] and seeds[0] != seeds[2]  # N = 2 per prompt share one
    assert len(set(branch)) == 4  # ... and each branches with its own noise


def test_k_draws_average_the_per_draw_losses(tmp_path, monkeypatch, toy_model):
    seen = []
    real = online_vpo.dpo_loss

    def spy(e_w, *a):
        loss, inside = real(e_w, *a)
        seen.append((e_w.detach().clone(), loss.detach().clone()))
        return loss, inside
    monkeypatch.setattr(online_vpo, "dpo_loss", spy)
    two = FAST + ["--steps", "2", "--ref-update-interval", "0", "--lr", "1e-2"]  # step 2: policy != reference
    out2 = str(tmp_path / "k2")
    run_main(online_vpo, two + ["--dpo-draws", "2", "--out", out2])
    assert len(seen) == 4 and not torch.equal(seen[0][0], seen[1][0])  # two different (t, eps) draws per step
    rows = [json.loads(line) for line in open(os.path.join(out2, "metrics.jsonl")) if '"loss"' in line]
    want = ((seen[2][1] + seen[3][1]) / 2).mean().item()  # L = mean over the pairs and the K draws
    assert abs(rows[1]["loss"] - want) < 1e-6 and abs(want - 0.693147) > 1e-4
    k2 = list(seen)
    seen.clear()
    run_main(online_vpo, FAST + ["--steps", "1", "--out", str(tmp_path / "k1")])
    assert len(seen) == 1 and torch.equal(seen[0][0], k2[0][0])  # draw 0 of K is the paper's one-draw estimator


def test_epochs_update_twice_per_sampled_batch(tmp_path, monkeypatch, toy_model):
    steps = []
    monkeypatch.setattr(distributed, "clip_grad_norm", lambda params, m: steps.append(1) or 0.0)
    run_main(online_vpo, FAST + ["--steps", "2", "--dpo-epochs", "3", "--out", str(tmp_path / "e")])
    assert len(steps) == 6


def test_pairing_all_uses_every_candidate_pair(tmp_path, toy_model):
    out = str(tmp_path / "all")
    run_main(online_vpo, FAST + ["--steps", "1", "--num-candidates", "3", "--pairing", "all", "--out", out])
    row = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in line][0]
    assert row["pairs_used"] + row["pairs_skipped"] == 2 * 3  # 2 prompts x C(3, 2) pairs
    assert row["margin"] >= 0  # each pair's winner is its higher-reward member


def test_logit_normal_timesteps_avoid_the_ends(toy_model):
    g = torch.Generator().manual_seed(0)
    u = common.sample_train_timesteps(toy_model, 20000, g) / 1000
    ln = common.sample_train_timesteps(toy_model, 20000, g, "logit-normal") / 1000
    ends = lambda s: ((s < 0.1) | (s > 0.95)).float().mean().item()  # noqa: E731
    assert ends(ln) < 0.5 * ends(u)
    # sigma = shift u / (1 + (shift - 1) u) with u = sigmoid(z): its median is shift(0.5) = 2/3 for shift 2
    assert abs(ln.median().item() - 2 / 3) < 0.01


def test_implicit_accuracy_sees_a_policy_fitted_to_the_winner(toy_model):
    model = models.load_model("toy")  # (its own copy: the session's toy_model stays without an adapter)
    params = common.setup_trainable(model, 4)
    init = common.Reference(params, model.experts)
    g = torch.Generator().manual_seed(1)
    x0_w, x0_l = torch.randn(2, 3, 4, 16, 16, generator=g), torch.randn(2, 3, 4, 16, 16, generator=g)
    prompts = [PROMPT, "a blue circle falling"]
    ids = [(0,), (1,)]
    assert common.implicit_accuracy(model, x0_w, x0_l, prompts, init, 0, ids) == [0.5, 0.5]  # policy == init: a tie
    opt = torch.optim.Adam(params, lr=3e-3)
    emb, mask = model.encode_prompts(prompts)
    for i in range(30):  # fit the winners (supervised fine-tuning on x0_w only)
        t = common.sample_train_timesteps(model, 2, g)
        x_t, target = common.noisy_and_target(model, x0_w, torch.randn(x0_w.shape, generator=g), t)
        common.per_sample_mse(model.denoise(x_t, t, emb, mask), target).mean().backward()
        opt.step()
        opt.zero_grad()
    assert common.implicit_accuracy(model, x0_w, x0_l, prompts, init, 0, ids, draws=8) == [1.0, 1.0]
    assert common.implicit_accuracy(model, x0_l, x0_w, prompts, init, 0, ids, draws=8) == [0.0, 0.0]  # swapped
    # one pair per forward gives the same answers: each pair's draws are keyed by its id, not its position
    assert common.implicit_accuracy(model, x0_w, x0_l, prompts, init, 0, ids, draws=8, batch_size=1) == [1.0, 1.0]


def test_evaluation_seeds_add_videos_and_keep_seed_zero(tmp_path, monkeypatch, toy_model):
    seen = []
    real = common.sample_and_score

    def spy(model, prompts, seeds, *a, **k):
        seen.append(list(seeds))
        return real(model, prompts, seeds, *a, **k)
    monkeypatch.setattr(common, "sample_and_score", spy)
    d = distributed.Dist(0, 1, "cpu")
    reward = lambda v, p: {"reward": v.mean((1, 2, 3, 4))}  # noqa: E731
    kw = dict(num_frames=4, height=16, width=16, steps=2, guidance=3.0)
    one = common.evaluate(toy_model, reward, [PROMPT, "a blue circle falling"], 0, kw, d)
    three = common.evaluate(toy_model, reward, [PROMPT, "a blue circle falling"], 0, kw, d, seeds_per_prompt=3)
    assert len(seen[0]) == 2 and len(seen[1]) == 6 and seen[1][:2] == seen[0]  # seed 0 as before, then 2 more
    assert len(set(seen[1])) == 6 and one["reward"] != three["reward"]


def test_branch_outside_the_sampler_is_refused_before_loading(tmp_path, monkeypatch):
    import pytest
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    for b in ("1", "-1"):  # --sample-steps 2: only step 0 has a later step to branch into
        with pytest.raises(ValueError, match="--branch-at"):
            run_main(online_vpo, FAST + ["--steps", "1", "--branch-at", b, "--out", str(tmp_path / b)])


def test_judge_timeout_and_retries_reach_the_reward(tmp_path, monkeypatch):
    import pytest
    import rewards
    seen = {}

    def capture(*a, **k):
        seen.update(k)
        raise KeyboardInterrupt  # (stop the run here)
    monkeypatch.setattr(rewards, "load_reward", capture)
    with pytest.raises(KeyboardInterrupt):
        run_main(online_vpo, FAST + ["--steps", "1", "--judge-timeout", "7", "--judge-retries", "2",
                                     "--out", str(tmp_path / "r")])
    assert seen["judge_timeout"] == 7.0 and seen["judge_retries"] == 2


def test_dpo_positive_penalises_a_rising_winner_error_by_hand():
    import math
    e_w, e_l = torch.tensor([0.30, 0.20]), torch.tensor([0.50, 0.10])
    r_w, r_l = torch.tensor([0.25, 0.20]), torch.tensor([0.40, 0.12])
    plain, inside0 = online_vpo.dpo_loss(e_w, e_l, r_w, r_l, beta=10.0)
    loss, inside = online_vpo.dpo_loss(e_w, e_l, r_w, r_l, beta=10.0, dpop=2.0)
    # pair 0: dw = +0.05, dl = +0.10 -> inside = -5 * (-0.05) = 0.25; the winner's error rose by 0.05: -2 * 5 * 0.05
    # pair 1: dw = 0 (no rise, no penalty), dl = -0.02 -> inside = -5 * 0.02 = -0.1
    assert torch.allclose(inside0, torch.tensor([0.25, -0.1])) and torch.allclose(inside, torch.tensor([-0.25, -0.1]))
    assert torch.allclose(loss, torch.tensor([math.log(1 + math.exp(0.25)), math.log(1 + math.exp(0.1))]), atol=1e-6)
    assert torch.equal(loss[1], plain[1])


def test_levers_sweep_smoke_runs_pairs_and_tabulates(tmp_path):
    """benchmarks/dpo_levers.py end to end (2 steps): a run per configuration, its paired gain, the table; a
    finished run is kept, not rerun."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import dpo_levers
    args = dpo_levers.p.parse_args(["--smoke", "--only", "paper", "--out", str(tmp_path)])
    table = dpo_levers.main(args)
    row = table["paper"]
    evals = [json.loads(line) for line in open(tmp_path / "paper_s0" / "metrics.jsonl") if '"eval"' in line]
    assert row["seeds"] == [0] and row["eval/reward"][0] == evals[-1]["eval/reward"] - evals[0]["eval/reward"]
    assert "| `paper` | 1 |" in open(tmp_path / "levers.md").read()
    assert dpo_levers.run_one("paper", 0, args, 0.0)[2] == "kept"


def test_gradient_signal_smoke(tmp_path):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "signal.json"
    subprocess.run([sys.executable, os.path.join(root, "benchmarks", "dpo_gradient_signal.py"), "--smoke",
                    "--threads", "1", "--out", str(out)], check=True, capture_output=True, timeout=600)
    rows = json.load(open(out))["results"]
    assert [r["pairs"] for r in rows] == ["independent", "branch at 1"]
    for r in rows:
        assert -1 <= r["cross_pair_cosine"] <= 1 and -1 <= r["within_pair_cosine"] <= 1 and r["margin"] >= 0
    assert rows[1]["pixel_mse_w_l"] < rows[0]["pixel_mse_w_l"]  # aligned pairs share their layout


def test_data_anchor_trains_on_true_renders_of_the_pairs_prompts(tmp_path, monkeypatch, toy_model):
    import toy_world
    seen = []
    real = common.noisy_and_target

    def spy(model, x0, eps, t):
        seen.append(x0.detach().clone())
        return real(model, x0, eps, t)
    monkeypatch.setattr(common, "noisy_and_target", spy)
    renders = []
    real_render = toy_world.render
    monkeypatch.setattr(toy_world, "render", lambda *a, **k: renders.append(real_render(*a, **k)) or renders[-1])
    run_main(online_vpo, FAST + ["--steps", "1", "--data-anchor", "0.5", "--out", str(tmp_path / "a")])
    assert len(seen) == 2 and len(renders) == 2  # the pairs' DPO draw, then the anchor on one render per pair
    assert torch.equal(seen[1], torch.cat(renders).permute(0, 2, 1, 3, 4) * 2 - 1)
    assert seen[1].shape == seen[0][:2].shape  # one render per pair (2 prompts)


def test_data_anchor_is_refused_off_the_toy_model(tmp_path, tiny_folders, monkeypatch):
    import pytest
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(ValueError, match="--data-anchor"):
        run_main(online_vpo, FAST + ["--steps", "1", "--model", tiny_folders["wan"], "--reward", "toy:text",
                                     "--data-anchor", "1", "--out", str(tmp_path / "w")])


def test_branch_on_wans_unipc_sampler_gives_candidates_their_own_noise(tiny_folders):
    """UniPC's corrector rebuilds the next sample from the previous one: the branch must reach it too (without,
    same-seed candidates stayed near-duplicates on Wan: spread 0.07 against 1.05 for independent seeds)."""
    model = models.load_model(tiny_folders["wan"])
    assert type(model.scheduler).__name__ == "UniPCMultistepScheduler"
    kw = dict(num_frames=5, height=16, width=16, steps=6, guidance=3.0)
    indep, _ = common.sample(model, [PROMPT] * 4, [1, 2, 3, 4], **kw)
    aligned, _ = common.sample(model, [PROMPT] * 4, [9] * 4, **kw, branch_at=1, branch_seeds=[1, 2, 3, 4])
    shared, _ = common.sample(model, [PROMPT] * 4, [9] * 4, **kw)
    assert shared.std(0).max() < 1e-5  # one seed, no branch: four copies of one video
    assert aligned.std(0).mean() > 0.5 * indep.std(0).mean()


def test_every_lever_together_trains_in_bf16(tmp_path, toy_model):
    """The regime users run: autocast bf16 with frozen weights stored in bf16, every lever on at once. Step 2
    (reference fixed, policy moved) must carry a DPO signal: inside != 0 and loss != log 2."""
    out = str(tmp_path / "bf16")
    run_main(online_vpo, FAST + ["--steps", "2", "--mixed-precision", "bf16", "--ref-update-interval", "0",
                                 "--lr", "1e-2", "--branch-at", "0", "--pairing", "all", "--dpo-draws", "2",
                                 "--dpo-epochs", "2", "--timestep-sampling", "logit-normal", "--dpop", "1",
                                 "--data-anchor", "0.5", "--heldout-pairs", "2", "--eval-seeds", "2", "--out", out])
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    step2 = [r for r in rows if r.get("step") == 2 and not r.get("eval")][0]
    assert step2["inside_mean"] != 0 and abs(step2["loss"] - 0.693147) > 1e-4
    evals = [r for r in rows if r.get("eval")]
    assert evals[0]["eval/heldout_implicit_acc"] == 0.5  # step 0: the policy is the initial model, every pair a tie
    assert 0 <= evals[-1]["eval/heldout_implicit_acc"] <= 1


# ---- the toy recipe: online_vpo's default on the toy model (docs/dpo_levers.md, issue #30) ----------------------
TOY = dict(recipe="toy", branch_at=2, dpo_draws=4, dpo_epochs=2, timestep_sampling="logit-normal", beta=2000.0,
           lr=3e-4, data_anchor=1.0)
PAPER = dict(recipe="paper", branch_at=None, dpo_draws=1, dpo_epochs=1, timestep_sampling="uniform", beta=None,
             lr=1e-4, data_anchor=0.0)


def resolved(argv, family="toy"):
    args = online_vpo.resolve_defaults(online_vpo.p.parse_args(argv), family)
    return {k: getattr(args, k) for k in TOY}


def test_the_toy_default_is_the_recipe_and_recipe_paper_is_the_papers_settings(tmp_path):
    assert resolved([]) == TOY
    assert resolved(["--recipe", "paper"]) == PAPER
    # a lever typed on the command line wins over its recipe's value; 'none' turns the branch off
    assert resolved(["--dpo-draws", "3", "--branch-at", "none", "--lr", "1e-3"]) == TOY | dict(
        dpo_draws=3, branch_at=None, lr=1e-3)
    assert resolved(["--recipe", "paper", "--branch-at", "1", "--beta", "500"]) == PAPER | dict(branch_at=1, beta=500.0)
    assert resolved([], family="wan") == PAPER  # real models: the paper's (beta: 100 once the model says flow)
    with pytest.raises(ValueError, match="--recipe paper"):
        resolved(["--recipe", "toy"], family="wan")
    # a resumed run keeps its own levers (config.json); where a run older than a flag lacks one, the paper's value
    # is what it ran with, and a run older than --recipe ran the paper's settings
    (tmp_path / "config.json").write_text("{}")
    assert resolved(["--resume", str(tmp_path)]) == PAPER


def test_a_run_that_turned_the_toy_recipes_branch_off_resumes_without_it(tmp_path, toy_model):
    """config.json stores the branch as None (independent samples): a resume must not take the recipe's step 2
    back (at --sample-steps 2 that would even be refused)."""
    out = str(tmp_path / "r")
    argv = FAST[:-2] + ["--branch-at", "none", "--dpo-draws", "2", "--steps", "1", "--save-every", "1", "--out", out]
    run_main(online_vpo, argv)
    run_main(online_vpo, ["--resume", out, "--steps", "2"])
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["recipe"] == "toy" and config["branch_at"] is None and config["dpo_draws"] == 2
    assert config["dpo_epochs"] == 2 and config["data_anchor"] == 1.0 and config["steps"] == 2
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows if not r.get("eval")] == [1, 2]


def test_the_toy_recipe_resumed_equals_an_uninterrupted_run(tmp_path, toy_model):
    """The default as users run it (aligned pairs, 4 draws, 2 epochs, logit-normal, the data anchor): a run
    stopped at step 1 and resumed ends where the uninterrupted run ends, bit for bit."""
    argv = FAST[:-2] + ["--sample-steps", "4", "--ref-update-interval", "0"]
    run_main(online_vpo, argv + ["--steps", "2", "--save-every", "1", "--out", str(tmp_path / "full")])
    run_main(online_vpo, argv + ["--steps", "1", "--save-every", "1", "--out", str(tmp_path / "part")])
    run_main(online_vpo, ["--resume", str(tmp_path / "part"), "--steps", "2"])
    full, part = (json.load(open(tmp_path / d / "config.json")) for d in ("full", "part"))
    assert full["recipe"] == part["recipe"] == "toy" and part["branch_at"] == 2 and part["dpo_draws"] == 4
    assert max_diff(final_params(str(tmp_path / "full")), final_params(str(tmp_path / "part"))) == 0.0
    rows = [[json.loads(line) for line in open(tmp_path / d / "metrics.jsonl")] for d in ("full", "part")]
    loss = [[r["loss"] for r in rs if "loss" in r and not r.get("eval")] for rs in rows]
    assert loss[0] == loss[1] and len(loss[0]) == 2


def test_torchrun_toy_recipe_two_ranks_equal_one_process(tmp_path, toy_model):
    """The toy default on 2 ranks (aligned candidates, 4 draws, 2 epochs, the data anchor's renders split with
    the pairs) = one process: weights and every update's averaged gradient."""
    args = FAST[:-2] + ["--sample-steps", "4", "--steps", "2", "--ref-update-interval", "0"]
    assert_ranks_agree_with_one_process("online_vpo", args, tmp_path, tol=3e-4)
