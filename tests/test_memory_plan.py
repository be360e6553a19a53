"""benchmarks/memory_plan.py's smoke version (CI): the plan's fake-tensor estimate equals the same code on real
tensors, and its categories (weights, gradients, AdamW state) equal their hand-computed sizes, on one rank and
sharded over 8 ranks of torch's fake process group. Runs in its own process (it creates a process group)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "memory_plan.py"), "--smoke", "--out", str(out)],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(out.read_text())


def test_fake_estimate_equals_real_tensors_on_the_tiny_wan(smoke):
    # DPO update, VADER update, sampling, RWR update, DPO --offload-frozen, VADER --decoder-grad own, GRPO's rollout
    # (the SDE sampler keeping its transitions, the group's stored latents) and update (reference, then policy)
    assert len(smoke["validations"]) == 8
    for v in smoke["validations"]:
        assert v["reference_gib"] > 0
        assert abs(v["ratio"] - 1) < 5e-3, v  # (host-side scheduler scalars aside, the same bytes)


def test_categories_equal_their_hand_computed_sizes(smoke):
    one, eight, offload, _ = smoke["rows"]
    assert (one["ranks"], one["fsdp"], eight["ranks"], eight["fsdp"]) == (1, False, 8, True)
    a1, e1 = one["after_step_gib"], one["expected_gib"]
    assert a1["grad"] == pytest.approx(e1["grads"], rel=1e-9)  # fp32 LoRA gradients
    assert a1["opt"] == pytest.approx(e1["optimizer"], rel=0.02)  # exp_avg + exp_avg_sq (+ AdamW's step scalars)
    assert a1["oth"] == pytest.approx(e1["grads"], rel=1e-9)  # the DPO reference: one fp32 copy of the LoRA
    assert a1["param"] + a1["grad"] + a1["oth"] == pytest.approx(e1["weights"] + e1["grads"], rel=1e-6)
    a8, e8 = eight["after_step_gib"], eight["expected_gib"]
    assert a8["sharded_grad"] == pytest.approx(e8["grads"], rel=1e-9)  # each rank: its shard of the gradients
    assert a8["opt"] == pytest.approx(e8["optimizer"], rel=0.05)
    assert a8["sharded_grad"] < a1["grad"] / 4 and a8["opt"] < a1["opt"] / 4  # (1/8, plus padding of tiny dims)
    # --offload-frozen (distributed.Offload, run by the plan as by the scripts): after the update's step only the
    # denoiser (base + LoRA), the gradients and the reference are resident; text encoder and VAE are not
    a, e = offload["after_step_gib"], offload["expected_gib"]
    assert "--offload-frozen" in offload["flags"] and e["weights"] < e1["weights"] / 2
    assert a["param"] + a["grad"] + a["oth"] == pytest.approx(e["weights"] + e["grads"], rel=1e-6)
    for row in smoke["rows"]:
        assert row["peak_gib"] >= sum(row["after_step_gib"].values()) - 1e-9


def test_context_parallel_shrinks_the_activations(smoke):
    """--cp 2 (diffusers' Ulysses attention on the fake group, as the scripts run it): each rank holds the
    activations of half of every video's tokens (plus the all-to-all buffers and the gathered output); the weights
    are those of the --fsdp row. Measured 0.42 -> 0.16 MiB on the tiny Wan."""
    eight, cp2 = smoke["rows"][1], smoke["rows"][3]
    assert "--cp 2" in cp2["flags"] and "--batch-size 4" in cp2["flags"]  # a context group holds one pair
    assert cp2["categories_gib"]["act"] < 0.6 * eight["categories_gib"]["act"]
    assert cp2["categories_gib"]["sharded_param"] == eight["categories_gib"]["sharded_param"]
