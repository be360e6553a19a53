"""--cp (context parallelism with diffusers' own Ulysses attention), on 2 CPU ranks over gloo: the denoiser's
output and every LoRA gradient equal one process's; a context group samples one video; one step of every script
with --cp 2 (alone, and with --fsdp) equals one process; the (data, context) mesh on 4 ranks; bad combinations
refused before anything loads."""
import json
import os
import subprocess
import sys

import pytest

import flow_grpo
import gran_dpo
import models
import online_vpo
import vader_grad
import vlm_feedback_rwr
from helpers import ROOT, assert_ranks_agree_with_one_process, run_main
from test_flow_grpo import FAST as GRPO
from test_regime import DPO, OVPO, RWR, VADER

SIZE = ["--num-frames", "9", "--height", "32", "--width", "32"]  # latents 3 x 4 x 4, 2x2 patches: 12 tokens


def launch(nproc, argv):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
                          *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]


def test_denoiser_under_cp2_equals_one_process(tmp_path, tiny_folders):
    """Output: bit-equal (each rank's attention sees every token, in another order only across heads); LoRA
    gradients summed over the context group: 1e-5 of the largest entry (measured 1.4e-6: a sum of two shares
    instead of one sum). Wan 2.1 and Wan 2.2 A14B (both experts, one timestep each)."""
    out = str(tmp_path / "r.json")
    launch(2, [os.path.join(ROOT, "tests", "cp_denoiser.py"), out, f"wan={tiny_folders['wan']}",
               f"wan_a14b={tiny_folders['wan_a14b']}"])
    r0, r1 = (json.load(open(out.replace(".json", f".rank{r}.json"))) for r in (0, 1))
    assert r0 == r1  # every member of the context group holds the same output, gradient and video
    for family, r in r0.items():
        assert r["out"] < 1e-6 and r["grad"] < 1e-5 and r["grad_scale"] > 0.1, (family, r)
        assert r["n_grads"] == (64 if family == "wan_a14b" else 32)  # (both experts' LoRA)
        assert r["sample"] < 1e-5, (family, r)  # the video the context group samples = one process's


@pytest.mark.parametrize("script,argv", [
    ("online_vpo", OVPO + ["--steps", "1"]),
    ("gran_dpo", DPO + ["--steps", "1", "--reward", "toy:quality", "--patch-grid", "1,2,2"]),
    ("vader_grad", VADER + ["--steps", "1"]),
    ("vlm_feedback_rwr", RWR),
    ("flow_grpo", GRPO + ["--steps", "1", "--sde-window", "0:2"]),
])
def test_script_cp2_equals_one_process(tmp_path, tiny_folders, script, argv):
    """One step of each script on a tiny Wan, torchrun 2 ranks with --cp 2 (one context group: both ranks hold
    the whole batch, each half of every video's tokens) == one process: weights, and the averaged gradient."""
    args = argv + SIZE + ["--model", tiny_folders["wan"]] + ([] if "--reward" in argv or "--judge" in argv else
                                                            ["--reward", "toy:text"])
    # gradients: the context group's two shares summed vs one sum, ~1e-5 of the largest entry (GRPO's are ~4e-7,
    # a mean over latent elements); a share not summed (or summed twice) is off by half of it
    assert_ranks_agree_with_one_process(script, args, tmp_path, tol=1e-5, grad_rtol=1e-4, ranks_only=["--cp", "2"])


@pytest.mark.parametrize("regime", ["fp32", "bf16"])
def test_cp2_with_fsdp_equals_one_process(tmp_path, tiny_folders, regime):
    """--cp 2 --fsdp: FSDP2 shards over every rank and reduce-scatters a MEAN over them; the context group's
    share of the gradient must be summed (average_gradients multiplies by cp): 100% off without it. bf16: the
    regime users launch (bf16, FSDP2 in both runs so that the numerics match, per-block gradient checkpointing,
    whose recomputed attention repeats the all-to-alls in the backward)."""
    args = OVPO + ["--steps", "1", "--reward", "toy:text", "--model", tiny_folders["wan"]] + SIZE
    if regime == "bf16":
        args += ["--mixed-precision", "bf16", "--fsdp", "--grad-checkpointing"]
    assert_ranks_agree_with_one_process("online_vpo", args, tmp_path, tol=1e-4 if regime == "fp32" else 5e-3,
                                        grad_rtol=1e-5 if regime == "fp32" else 0.15,
                                        ranks_only=["--cp", "2"] + ([] if regime == "bf16" else ["--fsdp"]))


def test_mesh_on_four_ranks(tmp_path):
    """(data, context) = (2, 2) on 4 ranks: ranks 0,1 and 2,3 are context groups (data ranks 0 and 1); the
    data-parallel collectives run within each context coordinate; average_gradients sums every rank's share
    and divides by the data size."""
    launch(4, [os.path.join(ROOT, "tests", "cp_mesh.py"), str(tmp_path)])
    rows = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(4)]
    assert [(r["rank"], r["world"], r["cp"], r["main"]) for r in rows] == [
        (0, 2, 2, True), (0, 2, 2, False), (1, 2, 2, False), (1, 2, 2, False)]
    for r in rows:  # all_gather_tensor over the data group: one entry per data rank, in data-rank order
        assert r["gathered"] == [0.0, 1.0] and r["mean"] == 0.5
        # grad on global rank g is g + 1: sum 1+2+3+4 = 10 over the world, / 2 data ranks
        assert r["grad"] == 5.0


@pytest.mark.parametrize("argv,world,match", [
    (["--cp", "2"], 2, "toy's denoiser does not train under diffusers' context parallelism"),
    (["--cp", "2", "LTX", "--num-frames", "9", "--height", "32", "--width", "32"], 2,
     "ltx's denoiser does not train"),  # (diffusers' LTX plan fails with the text mask: docs/real_models.md)
    (["--cp", "2", "WAN"] + SIZE, 3, "must divide the number of ranks"),
    (["--cp", "4", "WAN"] + SIZE, 4, "splits the 2 attention heads"),
    (["--cp", "2", "WAN", "--num-frames", "9", "--height", "16", "--width", "16"], 2, "is 3 tokens, not divisible"),
    (["--cp", "0", "WAN"] + SIZE, 1, "pass 1 \\(off\\)"),
])
@pytest.mark.parametrize("script", [online_vpo, gran_dpo, vader_grad, vlm_feedback_rwr, flow_grpo])
def test_bad_cp_refused_before_loading(tmp_path, tiny_folders, monkeypatch, script, argv, world, match):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded a model before refusing"))
    argv = [a for x in argv for a in (["--model", tiny_folders[x.lower()]] if x in ("WAN", "LTX") else [x])]
    with pytest.raises(ValueError, match=match):
        run_main(script, argv + ["--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
