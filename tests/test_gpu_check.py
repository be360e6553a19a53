"""benchmarks/gpu_check.py --smoke (CI): the one-command GPU check runs its whole code path on CPU with tiny configs,
every step passes its own checks, a step that raises is recorded and the next one still runs, the budget stops new
steps, and the JSON is always written."""
import json
import math
import os
import subprocess
import sys

import pytest

from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_check  # noqa: E402

REAL_STEPS = [key for key, *_ in gpu_check.STEPS]


def planted_failure(rec, ctx):
    rec["partial"] = 1.0  # figures recorded before a failure are kept
    raise RuntimeError("planted failure")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One in-process --smoke run, with a step that raises planted between steps 1 and 2."""
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    steps = list(gpu_check.STEPS)
    steps.insert(1, ("1b_planted", "a step that raises", planted_failure, None))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gpu_check, "STEPS", steps)
        results = gpu_check.main(["--smoke", "--out", str(out)])
    return results, json.loads(out.read_text())


def test_every_step_passes_and_the_json_is_written(smoke):
    results, written = smoke
    assert written["steps"].keys() == results["steps"].keys()
    assert list(written["steps"]) == REAL_STEPS[:1] + ["1b_planted"] + REAL_STEPS[1:]
    for key in REAL_STEPS:
        assert written["steps"][key]["ok"] is True, (key, written["steps"][key].get("traceback"))
    assert written["smoke"] and written["versions"]["torch"] and written["device"] == "cpu"
    assert written["bf16_peak_flops"] is None and written["elapsed_s"] > 0


def test_a_step_that_raises_is_recorded_and_the_next_still_runs(smoke):
    steps = smoke[1]["steps"]
    planted = steps["1b_planted"]
    assert planted["ok"] is False and planted["error"] == "RuntimeError: planted failure"
    assert "planted_failure" in planted["traceback"] and planted["partial"] == 1.0
    assert steps["2_sampler"]["ok"] is True  # the step after it ran


def test_every_script_trains_in_bf16_inside_the_process_group(smoke):
    rec = smoke[1]["steps"]["1_scripts"]
    assert rec["process_group"] == {"backend": "cpu:gloo", "world_size": 1, "all_reduce_ok": ["cpu"]}
    assert set(rec["scripts"]) >= {"online_vpo", "gran_dpo", "vader_grad", "vlm_feedback_rwr"}
    for name in ("online_vpo", "gran_dpo"):  # DPO: policy == reference at step 1, a real signal at step 2
        s = rec["scripts"][name]
        assert s["ok"] and s["inside_step1"] == 0.0 and s["inside_step2"] != 0.0, s
        assert abs(s["loss_step2"] - math.log(2)) > 1e-4, s
    assert rec["scripts"]["vader_grad"]["lora_B_grad_min"] > 0  # the reward gradient reaches every adapter
    assert rec["scripts"]["vlm_feedback_rwr"]["batches_trained"] > 0


def test_our_sampler_equals_the_stock_pipeline(smoke):
    rec = smoke[1]["steps"]["2_sampler"]
    assert rec["fp32"]["latents_max_abs"] < 1e-4 and rec["fp32"]["videos_max_abs"] < 1e-4  # identical up to rounding
    assert rec["ours_videos_per_s"] > 0 and rec["stock_videos_per_s"] > 0 and math.isfinite(rec["bf16"]["latents_rel"])


@pytest.mark.parametrize("key", ["3_update", "4a_update_big"])
def test_updates_report_memory_against_the_plan_and_flops(smoke, key):
    rec = smoke[1]["steps"][key]
    for kind in ("dpo", "vader"):
        r = rec[kind]
        assert r["flops"] > 0 and r["seconds"] > 0 and r["tflops_per_s"] > 0 and r["mfu"] is None  # (no GPU: no peak)
        assert r["peak_gib"] > 0 and r["peak_gib_plan"] > 0
        # on CPU the peak is torch's tracker on real tensors: the plan's fake-tensor estimate of the same update,
        # up to the AdamW state resident in the measured (second) update
        assert 0.95 < r["ratio_measured_over_plan"] < 1.1, r
        assert r["lora_B_grad_norm"] > 0 and math.isfinite(r["grad_norm"])
    assert "--decoder-grad own" in rec["vader"]["plan_flags"] and "--grad-checkpointing" in rec["dpo"]["plan_flags"]
    assert rec["dpo"]["inside"][0] == 0.0 and rec["dpo"]["inside"][1] != 0.0


def test_speed_options_are_ratios_against_eager(smoke):
    rec = smoke[1]["steps"]["4b_speed"]
    assert rec["eager_s"] > 0 and any(k.startswith("compile") for k in rec["speedup_over_eager"])
    assert all(v > 0 for v in rec["speedup_over_eager"].values())


def test_budget_stops_new_steps_and_the_json_is_still_written(tmp_path):
    out = tmp_path / "b.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--smoke", "--budget-s", "0",
                          "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    steps = json.loads(out.read_text())["steps"]
    assert list(steps) == REAL_STEPS and all(s["ok"] is None and s["skipped"].startswith("budget") for s in steps.values())
    assert "| 1_scripts" in res.stdout and "skipped" in res.stdout  # the table


def test_bf16_peak_by_device_name():
    assert gpu_check.bf16_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_check.bf16_peak("NVIDIA H100 PCIe") == 756e12
    assert gpu_check.bf16_peak("NVIDIA H200") == 989e12
    assert gpu_check.bf16_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_check.bf16_peak("NVIDIA GeForce RTX 4090") is None
