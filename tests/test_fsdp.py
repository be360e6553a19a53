"""FSDP2 (--fsdp): each script under `torchrun --nproc_per_node 2 --fsdp` (gloo, CPU tensors: FSDP2 runs
there) ends with the weights one process reaches on the union of the data, its every update's gradient
equal to one process's; a sharded save/resume round trip equals an uninterrupted run; the LoRA that rank 0
gathers and writes equals the single process's file."""
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

import common
from helpers import assert_ranks_agree_with_one_process, load_rank, max_diff, torchrun
from test_flow_grpo import FAST as GRPO
from test_regime import DPO, OVPO, RWR, UNEVEN, VADER, two_prompts  # noqa: F401 (a fixture)


@pytest.mark.parametrize("script,argv,extra", [
    ("online_vpo", OVPO + UNEVEN + ["--steps", "2"], ["--tie", "red"]),  # a rank with no pair still runs its forward
    ("gran_dpo", DPO + UNEVEN + ["--steps", "2", "--reward", "toy:quality"], ["--tie", "red"]),
    ("vader_grad", VADER + ["--steps", "2"], []),
    ("vlm_feedback_rwr", RWR, []),
    ("flow_grpo", GRPO + ["--steps", "2", "--sde-window", "0:2", "--kl-beta", "0.5"], []),  # one group per rank
    ("online_vpo", OVPO + ["--steps", "2", "--lora-rank", "0", "--lr", "1e-4"], []),  # a full fine-tune, sharded
    # bf16: FSDP2 casts every weight to bf16 where autocast keeps some ops fp32, so the one process runs
    # --fsdp too (a world of 1): the same numerics, and the comparison is about the ranks
    ("vader_grad", VADER + ["--steps", "2", "--mixed-precision", "bf16", "--fsdp"], []),
    ("online_vpo", OVPO + ["--steps", "2", "--mixed-precision", "bf16", "--fsdp", "--ref-update-interval", "0",
                          "--offload-frozen"], []),  # (the text encoder freed during each sharded update)
])
def test_fsdp_two_ranks_equal_one_process(tmp_path, toy_model, two_prompts, script, argv, extra):
    args = argv + (two_prompts if extra else [])
    # gradients agree to ~2e-6 relative (reduce-scatter sums in another order); AdamW turns that into weight
    # differences of a few 1e-5 on near-zero entries, so weights at 1e-4 and gradients at 1e-5 relative. bf16:
    # FSDP2 casts every weight to bf16: gradients at 0.15 of the largest entry (DPO multiplies bf16 rounding by
    # beta: 8% measured on the step-11000 toy base; a missing / world would be 100%, a per-rank mean over uneven
    # pairs tens of %), weights at lr scale
    # (a full fine-tune has many near-zero gradient entries whose sign is rounding noise: AdamW moves each by up
    # to lr per step either way, so there the weights are compared at 4 x lr x steps; the gradients stay tight)
    bf16, full_ft = "bf16" in args, [args[i + 1] for i, a in enumerate(args) if a == "--lora-rank"][-1] == "0"
    assert_ranks_agree_with_one_process(script, args, tmp_path, tol=5e-3 if bf16 else 8e-4 if full_ft else 1e-4,
                                        grad_rtol=0.15 if bf16 else 1e-4 if script == "flow_grpo" else 1e-5, extra=extra,
                                        ranks_only=["--fsdp"])  # (GRPO's second update: 1.1e-5 measured)
    if script == "online_vpo" and bf16:  # the reference swap under FSDP2's own bf16 casts: a real DPO signal
        rows = [json.loads(line) for line in open(tmp_path / "ddp" / "metrics.jsonl") if '"eval"' not in line]
        assert rows[1]["inside_mean"] != 0.0 and abs(rows[1]["loss"] - math.log(2)) > 1e-6
    ck = {f: common.latest_checkpoint(str(tmp_path / f)) for f in ("ddp", "one")}
    assert os.path.isdir(os.path.join(ck["ddp"], "sharded"))  # torch.distributed.checkpoint shards
    if full_ft:
        return  # (a full fine-tune writes no LoRA)
    lora = {f: load_file(os.path.join(ck[f], "lora", "pytorch_lora_weights.safetensors")) for f in ck}
    assert sorted(lora["ddp"]) == sorted(lora["one"]) and all(
        (lora["ddp"][k] - lora["one"][k]).abs().max() < (5e-3 if bf16 else 1e-4) for k in lora["one"])  # rank 0: all of it


@pytest.mark.parametrize("script,argv,length", [
    ("online_vpo", OVPO + ["--lr", "1e-2", "--ref-update-interval", "3"], "steps"),
    ("gran_dpo", DPO + ["--lr", "1e-2"], "steps"),
    ("vader_grad", VADER, "steps"),
    ("vlm_feedback_rwr", RWR, "rounds"),
    ("flow_grpo", GRPO + ["--lr", "1e-2", "--sde-window", "1:3"], "steps"),
])
def test_fsdp_resume_equals_an_uninterrupted_run(tmp_path, toy_model, script, argv, length):
    n, half = ("4", "2") if length == "steps" else ("2", "1")
    every = ["--save-every", half] if length == "steps" else []
    torchrun(script, argv + ["--fsdp", f"--{length}", n, "--out", str(tmp_path / "full")] + every)
    # the uninterrupted run's own half-way checkpoint (as a preempted job leaves it), continued in a new folder
    middle = os.path.join(tmp_path, "full", "checkpoints", f"step-{int(half):06d}")
    torchrun(script, argv + ["--fsdp", f"--{length}", n, "--resume", middle, "--out", str(tmp_path / "resumed")])
    assert max_diff(load_rank(str(tmp_path / "full"), 0), load_rank(str(tmp_path / "resumed"), 0)) < 1e-6
    # the new folder holds the whole run's record (its step-0 evaluation included), equal to the uninterrupted one
    evals = {f: [r for r in map(json.loads, open(tmp_path / f / "metrics.jsonl")) if r.get("eval")]
             for f in ("full", "resumed")}
    assert [r["step"] for r in evals["resumed"]] == [r["step"] for r in evals["full"]]
    assert all(abs(evals["resumed"][-1][k] - v) < 1e-3 for k, v in evals["full"][-1].items() if k.startswith("eval/"))
    if script == "online_vpo":  # a sharded checkpoint needs --fsdp to resume, and says so
        with pytest.raises(AssertionError, match="written with --fsdp"):
            torchrun(script, argv + ["--steps", "6", "--resume", middle, "--out", str(tmp_path / "plain")])
