"""pretrain_toy.py: its options build what they say, a fine-tune starts from the given weights, the output loads."""
import collections
import json
import os

import pytest
import torch

import common
import models
import pretrain_toy
import toy_world
from helpers import run_main

TINY = ["--batch-size", "2", "--num-frames", "4", "--size", "16", "--threads", "1"]


def test_balanced_sampling_covers_every_train_prompt_by_category():
    categories = [[toy_world.CATEGORY[toy_world.parse_prompt(p)["motion"]] for p in group] for group in pretrain_toy.BY_CATEGORY]
    assert sorted(c[0] for c in categories) == sorted(set(toy_world.CATEGORY.values()))
    assert all(len(set(c)) == 1 for c in categories)  # each group is one category
    assert sorted(p for g in pretrain_toy.BY_CATEGORY for p in g) == sorted(toy_world.TRAIN_PROMPTS)
    # uniform sampling is dominated by pushes; balanced gives each category a quarter
    counts = collections.Counter(toy_world.CATEGORY[toy_world.parse_prompt(p)["motion"]] for p in toy_world.TRAIN_PROMPTS)
    assert counts["interaction"] > 0.5 * len(toy_world.TRAIN_PROMPTS)


def test_the_defaults_are_the_shipped_base_recipe():
    """`python pretrain_toy.py` (what the load error and conftest tell a user to run) trains the shipped
    architecture on the shipped schedule: the shipped run's recorded flags, except where it was written and how."""
    shipped = json.load(open(os.path.join(models.TOY_PATH, "pretrain_log.json")))["args"]
    defaults = vars(pretrain_toy.p.parse_args([]))
    where_and_how = {"out", "threads", "resume", "ckpt", "device", "stop_at", "save_every"}
    differs = {k: (defaults[k], v) for k, v in shipped.items() if k not in where_and_how and defaults[k] != v}
    assert not differs, f"(default, shipped) {differs}"
    assert shipped["stop_at"] == 11000  # the one flag the README command adds: --stop-at 11000


def test_options_and_init_from(tmp_path):
    first = tmp_path / "a" / "toy"
    arch = ["--heads", "2", "--head-dim", "32", "--layers", "2", "--ffn-dim", "64", "--patch", "2", "--patch-t", "1"]
    run_main(pretrain_toy, TINY + arch + ["--steps", "2", "--sampling", "uniform", "--timesteps", "uniform", "--out", str(first)])
    model = models.load_model(str(first))  # the ordinary loading path
    cfg = model.denoiser.config
    assert (cfg.num_attention_heads, cfg.attention_head_dim, cfg.num_layers, cfg.ffn_dim, tuple(cfg.patch_size)) == (2, 32, 2, 64, (1, 2, 2))
    log = json.load(open(first / "pretrain_log.json"))
    assert log["args"]["timesteps"] == "uniform" and log["args"]["sampling"] == "uniform"
    ckpt = tmp_path / "a" / "toy_pretrain_ckpt.pt"
    assert torch.load(ckpt, weights_only=False)["step"] == 2
    # --init-from with no steps to run exports the checkpoint's EMA weights unchanged
    second = tmp_path / "b" / "toy"
    run_main(pretrain_toy, TINY + arch + ["--steps", "0", "--init-from", str(ckpt), "--out", str(second)])
    a, b = models.load_model(str(first)), models.load_model(str(second))
    assert all(torch.equal(x, y) for x, y in zip(a.denoiser.state_dict().values(), b.denoiser.state_dict().values()))
    assert all(torch.equal(x, y) for x, y in zip(a.text_encoder.state_dict().values(), b.text_encoder.state_dict().values()))
    assert not os.path.exists(tmp_path / "b" / "toy_pretrain_ckpt.pt.tmp")


def test_temporal_patches_and_shift_reach_the_shipped_folder(tmp_path):
    out = tmp_path / "t" / "toy"
    arch = ["--heads", "2", "--head-dim", "32", "--layers", "1", "--ffn-dim", "64", "--patch-t", "2", "--shift", "2"]
    run_main(pretrain_toy, TINY + arch + ["--steps", "1", "--out", str(out)])
    model = models.load_model(str(out))
    assert tuple(model.denoiser.config.patch_size) == (2, 4, 4)  # two frames per token
    assert model.scheduler.config.shift == 2.0  # the sampler shifts the noise levels as training did
    with torch.no_grad():
        _, video = common.sample(model, ["a red square falling"], [0], 4, 16, 16, 2, 3.0)
    assert video.shape == (1, 4, 3, 16, 16)
    import online_vpo  # an odd frame count cannot be cut into 2-frame tokens: refused before loading, saying why
    with pytest.raises(ValueError, match="multiple of 2 .the model's 2 frames per token"):
        run_main(online_vpo, ["--model", str(out), "--num-frames", "7", "--out", str(tmp_path / "r")])
    assert not os.path.exists(tmp_path / "r")


def run_killed_during_step_3(argv, monkeypatch):
    """pretrain_toy.main(argv), stopped by force (the session ends) during its step 3: steps 1-2 are saved."""
    render, calls = toy_world.render, []

    def crash_at_third_step(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return render(*a, **k)
    monkeypatch.setattr(toy_world, "render", crash_at_third_step)
    with pytest.raises(KeyboardInterrupt):
        run_main(pretrain_toy, argv)
    monkeypatch.setattr(toy_world, "render", render)


def test_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    # the checkpoint is two files (weights, then AdamW's moments in <ckpt>.opt); a resumed run needs both
    arch = ["--heads", "2", "--head-dim", "32", "--layers", "1", "--ffn-dim", "64", "--save-every", "1", "--steps", "3"]
    run_main(pretrain_toy, TINY + arch + ["--out", str(tmp_path / "a" / "toy")])
    run_killed_during_step_3(TINY + arch + ["--out", str(tmp_path / "b" / "toy")], monkeypatch)
    run_main(pretrain_toy, TINY + arch + ["--resume", "--out", str(tmp_path / "b" / "toy")])
    a, b = (torch.load(tmp_path / x / "toy_pretrain_ckpt.pt", weights_only=False) for x in "ab")
    assert a["step"] == b["step"] == 3
    assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))
    assert os.path.exists(tmp_path / "b" / "toy_pretrain_ckpt.pt.opt")


def test_stop_at_ships_the_uninterrupted_runs_step(tmp_path, monkeypatch):
    # --stop-at N keeps the --steps schedule and ships step N's EMA weights: the step-N checkpoint of a run
    # that goes on (how the shipped base was cut from a longer schedule)
    arch = ["--heads", "2", "--head-dim", "32", "--layers", "1", "--ffn-dim", "64", "--steps", "4", "--lr", "1e-2",
            "--save-every", "1"]
    run_killed_during_step_3(TINY + arch + ["--out", str(tmp_path / "a" / "toy")], monkeypatch)  # the 4-step run
    full = torch.load(tmp_path / "a" / "toy_pretrain_ckpt.pt", weights_only=False)
    run_main(pretrain_toy, TINY + arch + ["--stop-at", "2", "--out", str(tmp_path / "b" / "toy")])
    cut = torch.load(tmp_path / "b" / "toy_pretrain_ckpt.pt", weights_only=False)
    assert full["step"] == cut["step"] == 2 and json.load(open(tmp_path / "b" / "toy" / "pretrain_log.json"))["step"] == 2
    assert all(torch.equal(x, y) for x, y in zip(full["ema"], cut["ema"]))
    assert full["sched"]["_last_lr"] == cut["sched"]["_last_lr"]  # the 4-step schedule's rate, not a 2-step one's
    shipped = models.load_model(str(tmp_path / "b" / "toy")).denoiser
    names = [n for n, _ in shipped.named_parameters()]
    assert torch.equal(shipped.state_dict()[names[0]], cut["ema"][0])  # the folder holds the EMA weights
    with pytest.raises(ValueError, match="--stop-at 5 must lie within"):
        run_main(pretrain_toy, TINY + arch + ["--stop-at", "5", "--out", str(tmp_path / "d" / "toy")])
    run_main(pretrain_toy, TINY + arch + ["--out", str(tmp_path / "e" / "toy")])
    with pytest.raises(ValueError, match="past --stop-at 1"):  # a checkpoint beyond the cut is refused
        run_main(pretrain_toy, TINY + arch + ["--stop-at", "1", "--resume", "--out", str(tmp_path / "e" / "toy")])
