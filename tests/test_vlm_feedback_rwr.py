"""vlm_feedback_rwr.py: RWR weights by hand, all-zero feedback, the judge cache on resume, end to end, torchrun."""
import json
import math
import os

import pytest
import torch

import common
import models
import toy_world
import vlm_feedback_rwr as rwr
from helpers import assert_model_card_matches, assert_ranks_agree_with_one_process, max_diff, run_main

FAST = ["--rounds", "1", "--prompts-per-round", "4", "--videos-per-prompt", "2", "--batch-size", "4",
        "--sample-steps", "2", "--eval-seeds", "1", "--num-train-eval-prompts", "2", "--lora-rank", "4",
        "--eval-prompts", "toy_dynamics_heldout"]


def test_weights_equal_the_hand_computed_softmax():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])
    w = rwr.rwr_weights(r, beta=0.5)
    e = math.exp(1 / 0.5)
    want = torch.tensor([e, 1.0, 1.0, e]) / (2 * e + 2) * 4  # exp(r / beta) normalised to mean 1
    assert torch.allclose(w, want) and abs(w.mean().item() - 1) < 1e-6
    assert torch.allclose(rwr.rwr_weights(r, beta=1e-3), torch.tensor([2.0, 0.0, 0.0, 2.0]))  # small beta: accepted only
    assert torch.allclose(rwr.rwr_weights(r, beta=1e6), torch.ones(4), atol=1e-4)  # large beta: plain fine-tuning


def test_all_zero_feedback_neither_divides_by_zero_nor_trains(tmp_path, monkeypatch, toy_model):
    w = rwr.rwr_weights(torch.zeros(5), beta=0.1)
    assert torch.equal(w, torch.zeros(5))
    monkeypatch.setattr(toy_world.ToyJudge, "__call__", lambda self, v, p: {"reward": torch.zeros(len(p)),
                                                                            "yes": torch.zeros(len(p))})
    out = run_main(rwr, FAST + ["--out", str(tmp_path / "z")])
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    epochs = [r for r in rows if "epoch" in r]
    assert all(r["batches"] == 0 and r["batches_skipped_no_yes"] == 2 for r in epochs)
    state = torch.load(os.path.join(common.latest_checkpoint(out), "state.pt"), weights_only=False)
    assert state["optimizer"]["state"] == {}  # no optimizer step was taken


def test_judge_cache_is_used_on_resume(tmp_path, monkeypatch, toy_model):
    judged = []
    real = toy_world.ToyJudge.__call__
    monkeypatch.setattr(toy_world.ToyJudge, "__call__", lambda self, v, p: judged.append(len(p)) or real(self, v, p))
    real_save = common.save_checkpoint

    def crash(*a, **k):
        raise RuntimeError("simulated crash at the end of round 1")

    monkeypatch.setattr(common, "save_checkpoint", crash)
    out = str(tmp_path / "run")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_main(rwr, FAST + ["--judge", "judge:p_yes", "--out", out])
    first = sum(judged)
    assert first > 0 and os.path.exists(os.path.join(out, "judge_cache.rank0.jsonl"))
    monkeypatch.setattr(common, "save_checkpoint", real_save)
    judged.clear()
    run_main(rwr, FAST + ["--judge", "judge:p_yes", "--out", out, "--resume", out])
    n_eval = len(common.load_prompts("toy_dynamics_heldout")) + 2  # held-out + train-eval prompts, one seed each
    assert sum(judged) == n_eval  # only the round-1 evaluation is new: round-0 eval and the training data were cached


def test_a_crash_between_the_checkpoint_and_its_evaluation_is_evaluated_on_resume(tmp_path, monkeypatch, toy_model):
    real_save = common.save_checkpoint

    def save_then_crash(*a, **k):  # the round's checkpoint is written, the session ends before its evaluation
        real_save(*a, **k)
        raise RuntimeError("simulated crash after the checkpoint")
    monkeypatch.setattr(common, "save_checkpoint", save_then_crash)
    out = str(tmp_path / "run")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_main(rwr, FAST + ["--judge", "judge:p_yes", "--out", out])
    monkeypatch.setattr(common, "save_checkpoint", real_save)
    run_main(rwr, FAST + ["--judge", "judge:p_yes", "--out", out, "--resume", out])
    evals = [r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if r.get("eval")]
    assert [r["round"] for r in evals] == [0, 1]  # the final round's evaluation, once
    assert_model_card_matches(out)
    run_main(rwr, FAST + ["--judge", "judge:p_yes", "--out", out, "--resume", out])  # a finished run: nothing new
    assert [r["round"] for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if r.get("eval")] == [0, 1]


def test_dpo_trains_on_a_round_with_fewer_pairs_than_a_full_batch(tmp_path, monkeypatch, toy_model):
    # yes, no, yes, no ...: each prompt's two videos make one (yes, no) pair, 4 pairs a round. --batch-size 16
    # (videos) asks for 8 pairs a step: the round's 4 pairs make one shorter batch, not none (it used to train nothing)
    monkeypatch.setattr(toy_world.ToyJudge, "__call__", lambda self, v, p: {"reward": (torch.arange(len(p)) % 2 == 0).float(),
                                                                            "yes": (torch.arange(len(p)) % 2 == 0).float()})
    out = run_main(rwr, FAST + ["--loss", "dpo", "--batch-size", "16", "--epochs", "2", "--lr", "1e-2",
                                "--out", str(tmp_path / "d")])
    epochs = [r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "epoch" in r]
    assert [r["batches"] for r in epochs] == [1, 1] and [r["pairs"] for r in epochs] == [4, 4]
    # the first step's policy IS its reference (LoRA starts at zero): inside = 0, loss = log 2 exactly; then it moves
    assert abs(epochs[0]["loss"] - math.log(2)) < 1e-5 and abs(epochs[1]["loss"] - math.log(2)) > 1e-4
    state = torch.load(os.path.join(common.latest_checkpoint(out), "state.pt"), weights_only=False)
    assert state["optimizer"]["state"] != {}
    with pytest.raises(ValueError, match="two per"):  # an odd number of videos cannot be split into pairs
        run_main(rwr, FAST + ["--loss", "dpo", "--batch-size", "5", "--out", str(tmp_path / "odd")])


@pytest.mark.parametrize("loss", ["rwr", "dpo"])
def test_one_round_end_to_end(tmp_path, toy_model, loss):
    out = run_main(rwr, FAST + ["--judge", "judge:p_yes", "--loss", loss, "--out", str(tmp_path / loss)])
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    evals = [r for r in rows if r.get("eval")]
    assert [r["round"] for r in evals] == [0, 1]
    for k in ("eval/pass_rate", "eval/pass_rate/interaction", "train/pass_rate", "judge_calls", "judge_seconds"):
        assert k in evals[0]
    assert any("epoch" in r and math.isfinite(r["loss"]) for r in rows)
    assert os.listdir(os.path.join(out, "samples")) and common.latest_checkpoint(out).endswith("step-000001")
    assert_model_card_matches(out)
    if loss == "rwr":  # the round-0 evaluation also scores every toy dimension of its held-out videos (the base's)
        prompts = common.load_prompts("toy_dynamics_heldout")
        with torch.no_grad():
            _, videos = common.sample(toy_model, prompts, [common.seed_for(0, "eval", i, 0) for i in range(len(prompts))],
                                      8, 32, 32, 2, 3.0)  # (the toy default guidance)
        want = toy_world.ToyReward()(videos, prompts)
        for k in ("temporal_consistency", "shape", "motion"):
            assert abs(evals[0][f"eval/{k}"] - want[k].mean().item()) < 1e-4, k
        acc = toy_world.ToyReward().color_accuracy(videos, prompts).mean().item()
        assert abs(evals[0]["eval/color_accuracy"] - acc) < 1e-6


def test_one_round_with_a_tiny_transformers_vlm_judge(tmp_path, toy_model, qwen_vl_folder):
    out = run_main(rwr, FAST + ["--judge", f"vlm@{qwen_vl_folder}", "--out", str(tmp_path / "vlm"),
                                "--question", "Does {prompt} happen? Answer yes or no."])
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["round"] for r in rows if r.get("eval")] == [0, 1]
    cache = [json.loads(line) for line in open(os.path.join(out, "judge_cache.rank0.jsonl"))]
    assert cache[0]["question"].startswith("Does a ") and cache[0]["yes"] in (0.0, 1.0)


def test_one_round_with_a_judge_behind_an_openai_compatible_server(tmp_path, toy_model):
    from test_rewards_real import FakeServer
    srv = FakeServer(p_yes=0.3)  # answers "no" (P(yes) 0.3) to every question
    try:
        out = run_main(rwr, FAST + ["--judge", f"api:judge-model@{srv.url}", "--out", str(tmp_path / "api")])
    finally:
        srv.close()
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    evals = [r for r in rows if r.get("eval")]
    assert [r["round"] for r in evals] == [0, 1] and evals[0]["eval/pass_rate"] == 0.0
    assert all(r["batches_skipped_no_yes"] > 0 and r["batches"] == 0 for r in rows if "epoch" in r)  # all "no": no update
    questions = {b["messages"][0]["content"][-1]["text"] for _, _, b in srv.requests}
    assert all(q.startswith("Does the ") and q.endswith("Answer yes or no.") for q in questions)


def test_bad_question_template_fails_early(tmp_path):
    with pytest.raises(ValueError, match="must contain {prompt}"):
        run_main(rwr, ["--question", "Is it good?", "--out", str(tmp_path / "q")])
    assert not os.path.exists(tmp_path / "q")


def test_torchrun_two_ranks(tmp_path, toy_model):
    args = FAST + ["--judge", "judge:p_yes"]
    _, one = assert_ranks_agree_with_one_process("vlm_feedback_rwr", args, tmp_path)
    ddp_rows, one_rows = ([r for r in map(json.loads, open(tmp_path / f / "metrics.jsonl")) if "epoch" in r]
                          for f in ("ddp", "one"))
    assert [r["loss"] for r in ddp_rows] == pytest.approx([r["loss"] for r in one_rows], rel=1e-5)  # not / world
    torch.manual_seed(0)  # the same LoRA init the scripts draw: training must have moved the weights
    m = models.load_model("toy")
    init = common.setup_trainable(m, 4)
    assert max_diff(one, init) > 1e-6
