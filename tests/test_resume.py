"""--resume continues the run that was started (issue #31, section 1): the saved configuration is the default,
only flags that do not change the run may differ, another script's run is refused by name, metrics.jsonl keeps
no duplicate rows, a torn last line blocks nothing, a live run folder is locked, and a run that failed before
its first checkpoint can be resumed (it starts afresh from its saved configuration)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import common
import models
import gran_dpo
import online_vpo
import vader_grad
import vlm_feedback_rwr as rwr
from helpers import ROOT, run_main

FAST = ["--batch-size", "2", "--num-candidates", "2", "--sample-steps", "2", "--num-eval-prompts", "2",
        "--lora-rank", "4", "--min-margin", "0", "--heldout-pairs", "2", "--recipe", "paper"]
RWR_FAST = ["--rounds", "1", "--prompts-per-round", "4", "--videos-per-prompt", "2", "--batch-size", "4",
            "--sample-steps", "2", "--eval-seeds", "1", "--num-train-eval-prompts", "2", "--lora-rank", "4",
            "--judge", "judge:p_yes"]


class Loaded(Exception):
    """Raised where the model would start loading: everything checked before it has passed."""


def refuse_to_load(*a, **k):
    raise Loaded


def cli(module, argv):
    """What `python <script>.py argv` does: the script's own parser, through common.parse_args."""
    return module.main(common.parse_args(module.p, argv))


def rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def steps_of(out, key="step"):
    """([training rows' steps], [evaluation rows' steps])."""
    r = rows(out)
    return [x[key] for x in r if not x.get("eval")], [x[key] for x in r if x.get("eval")]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, toy_model):
    """A finished 2-step online_vpo run (checkpoints at steps 1 and 2), started from a command line."""
    out = str(tmp_path_factory.mktemp("resume") / "run")
    argv = FAST + ["--steps", "2", "--save-every", "1", "--out", out]
    saved = sys.argv
    sys.argv = ["online_vpo.py", *argv]  # (so config.json records the command that started it)
    try:
        run_main(online_vpo, argv)
    finally:
        sys.argv = saved
    return out


def copy_run(src, tmp_path, name="run"):
    dst = str(tmp_path / name)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


# ---- the saved configuration is the default ---------------------------------------------------------
def test_resume_with_no_other_flag_continues_the_saved_configuration(tmp_path, finished_run, monkeypatch):
    run = copy_run(finished_run, tmp_path)
    started = json.load(open(os.path.join(run, "config.json")))
    assert started["command"].startswith("python online_vpo.py --batch-size 2")
    monkeypatch.setattr(sys, "argv", ["online_vpo.py", "--resume", run, "--steps", "3"])
    run_main(online_vpo, ["--resume", run, "--steps", "3"])
    cfg = json.load(open(os.path.join(run, "config.json")))
    for k in ("batch_size", "num_candidates", "num_eval_prompts", "lora_rank", "heldout_pairs", "sample_steps"):
        assert cfg[k] == started[k], k  # the run's own settings, not the script's defaults
    assert cfg["steps"] == 3 and cfg["command"] == started["command"]  # the command that started it is kept
    assert cfg["script"] == "online_vpo"
    last = [r for r in rows(run) if not r.get("eval")][-1]
    assert last["step"] == 3 and last["pairs_used"] + last["pairs_skipped"] == 2  # batch 2 really sampled


def test_resume_refuses_a_flag_that_changes_the_run_before_loading(tmp_path, finished_run, monkeypatch):
    run = copy_run(finished_run, tmp_path)
    config = open(os.path.join(run, "config.json")).read()
    monkeypatch.setattr(models, "load_model", refuse_to_load)
    for argv in (["--lr", "3e-4"], ["--beta", "50"], ["--reward", "toy:quality"], ["--seed", "1"],
                 ["--lora-rank", "8"], ["--model", models.TOY_PATH], ["--pairing", "all"],
                 ["--batch-size", "8"]):  # (8 is the parser's default: typed on the command line, still refused)
        with pytest.raises(ValueError, match=argv[0]) as e:
            cli(online_vpo, ["--resume", run] + argv)
        assert "a new --out" in str(e.value)  # ... and says what to do instead
    with pytest.raises(ValueError, match="--lr"):  # main() called from Python: a non-default value counts as given
        run_main(online_vpo, ["--resume", run, "--lr", "3e-4"])
    with pytest.raises(ValueError, match="--steps 1.*step 2"):  # the checkpoint is already past it
        cli(online_vpo, ["--resume", run, "--steps", "1"])
    # flags that only extend the run, change how often it evaluates or saves, or how it samples, pass
    for argv in (["--steps", "5"], ["--eval-every", "1", "--save-every", "1"], ["--sample-batch-size", "1"],
                 ["--lr", "1e-4", "--batch-size", "2"]):  # (the run's own values, typed again)
        with pytest.raises(Loaded):
            cli(online_vpo, ["--resume", run] + argv)
    assert open(os.path.join(run, "config.json")).read() == config  # nothing was written


def test_resume_refuses_another_scripts_run_by_name(tmp_path, finished_run, monkeypatch):
    run = copy_run(finished_run, tmp_path)
    monkeypatch.setattr(models, "load_model", refuse_to_load)
    for module in (gran_dpo, vader_grad, rwr):
        with pytest.raises(ValueError, match="online_vpo"):
            run_main(module, ["--resume", run])
    cfg = json.load(open(os.path.join(run, "config.json")))
    for drop in ("script", "command"):  # a run written before config.json named its script: told by its flags
        cfg.pop(drop)
        open(os.path.join(run, "config.json"), "w").write(json.dumps(cfg))
        for module in (gran_dpo, vader_grad, rwr):
            with pytest.raises(ValueError, match="online_vpo"):
                run_main(module, ["--resume", run])
    assert not os.path.exists(os.path.join(run, "checkpoints", "step-000004"))


def test_a_sharded_checkpoint_without_fsdp_is_refused_before_loading(tmp_path, finished_run, monkeypatch):
    run = copy_run(finished_run, tmp_path)
    os.makedirs(os.path.join(common.latest_checkpoint(run), "sharded"))  # what --fsdp writes beside state.pt
    monkeypatch.setattr(models, "load_model", refuse_to_load)
    with pytest.raises(ValueError, match="written with --fsdp"):
        run_main(online_vpo, ["--resume", run, "--steps", "3"])


# ---- metrics.jsonl: no duplicate rows, torn last lines --------------------------------------------------
def test_metrics_have_no_duplicate_rows_after_a_resume(tmp_path, toy_model):
    out = str(tmp_path / "run")
    args = FAST + ["--steps", "3", "--eval-every", "1", "--save-every", "2", "--out", out]
    run_main(online_vpo, args)
    shutil.rmtree(os.path.join(out, "checkpoints", "step-000003"))  # a crash after step 3's rows, before its checkpoint
    run_main(online_vpo, args + ["--resume", out])
    assert steps_of(out) == ([1, 2, 3], [0, 1, 2, 3])
    run_main(online_vpo, args + ["--resume", out])  # a finished run, resumed again: its final evaluation once
    assert steps_of(out) == ([1, 2, 3], [0, 1, 2, 3])


def test_rwr_resume_before_the_first_checkpoint_logs_round_0_once(tmp_path, monkeypatch, toy_model):
    real_save = common.save_checkpoint

    def crash(*a, **k):
        raise RuntimeError("simulated crash at the end of round 1")

    monkeypatch.setattr(common, "save_checkpoint", crash)
    out = str(tmp_path / "run")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_main(rwr, RWR_FAST + ["--out", out])
    monkeypatch.setattr(common, "save_checkpoint", real_save)
    run_main(rwr, RWR_FAST + ["--out", out, "--resume", out])
    assert steps_of(out, "round") == ([1], [0, 1])


def test_torn_last_lines_do_not_block_a_resume(tmp_path, monkeypatch, toy_model):
    real_save = common.save_checkpoint

    def save_then_crash(*a, **k):  # the round's checkpoint, then a crash in the middle of writing a line
        real_save(*a, **k)
        with open(os.path.join(out, "metrics.jsonl"), "a") as f:
            f.write('{"step": 2, "round": 1, "eval": tr')
        raise RuntimeError("simulated crash mid-write")

    monkeypatch.setattr(common, "save_checkpoint", save_then_crash)
    out = str(tmp_path / "run")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_main(rwr, RWR_FAST + ["--out", out])
    with open(os.path.join(out, "judge_cache.rank0.jsonl"), "a") as f:
        f.write('{"key": "eval-eval-r1-0-0-a red sq')
    monkeypatch.setattr(common, "save_checkpoint", real_save)
    run_main(rwr, RWR_FAST + ["--rounds", "2", "--out", out, "--resume", out])
    assert steps_of(out, "round") == ([1, 2], [0, 1, 2])  # every line parses: the torn ones are gone
    cache = [json.loads(line) for line in open(os.path.join(out, "judge_cache.rank0.jsonl"))]
    assert cache and all("yes" in row for row in cache)


# ---- a live run is locked ---------------------------------------------------------------------------
HOLD = """import fcntl, os, sys, time
f = open(os.path.join(sys.argv[1], ".lock"), "a+")
fcntl.flock(f, fcntl.LOCK_EX)
f.seek(0); f.truncate(); f.write(f"{os.getpid()}\\n"); f.flush()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_run_folder_in_use_is_refused(tmp_path, finished_run, monkeypatch):
    run = copy_run(finished_run, tmp_path)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    monkeypatch.setattr(models, "load_model", refuse_to_load)
    for folder, argv in ((str(fresh), ["--out", str(fresh)]), (run, ["--resume", run])):
        holder = subprocess.Popen([sys.executable, "-c", HOLD, folder], stdout=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            assert holder.stdout.readline().strip() == "locked"
            with pytest.raises(RuntimeError, match=f"in use.*PID {holder.pid}"):
                run_main(online_vpo, FAST + ["--steps", "2"] + argv)
        finally:
            holder.kill()
            holder.wait()
        with pytest.raises(Loaded):  # the holder is gone (even killed): the lock went with it
            run_main(online_vpo, FAST + ["--steps", "2"] + argv)


# ---- a failure before the first checkpoint ----------------------------------------------------------
def test_a_run_that_failed_before_its_first_checkpoint_can_be_resumed(tmp_path, monkeypatch, toy_model):
    out = str(tmp_path / "run")
    args = FAST + ["--steps", "2", "--out", out]
    real_step = torch.optim.AdamW.step

    def crash(self, *a, **k):
        raise RuntimeError("simulated crash in step 1")

    monkeypatch.setattr(torch.optim.AdamW, "step", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_main(online_vpo, args)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    with pytest.raises(FileExistsError, match="--resume"):  # rerunning would overwrite what it wrote ...
        run_main(online_vpo, args)
    run_main(online_vpo, ["--resume", out])  # ... --resume starts it afresh, from its saved configuration
    assert steps_of(out) == ([1, 2], [0, 2])
    assert common.latest_checkpoint(out).endswith("step-000002")
    assert json.load(open(os.path.join(out, "config.json")))["batch_size"] == 2


def test_a_flag_newer_than_the_run_is_refused_unless_at_its_default(tmp_path, finished_run, monkeypatch):
    """A run made before --dpo-draws existed ran with one draw: --dpo-draws 4 would change it mid-way."""
    run = copy_run(finished_run, tmp_path)
    cfg = json.load(open(os.path.join(run, "config.json")))
    del cfg["dpo_draws"]
    json.dump(cfg, open(os.path.join(run, "config.json"), "w"))
    monkeypatch.setattr(models, "load_model", refuse_to_load)
    with pytest.raises(ValueError, match="--dpo-draws 4 .*predates"):
        cli(online_vpo, ["--resume", run, "--dpo-draws", "4"])
    with pytest.raises(Loaded):  # its default is what the run ran with
        cli(online_vpo, ["--resume", run, "--dpo-draws", "1"])


def test_an_earlier_checkpoint_resumes_only_as_a_fork(tmp_path, finished_run, monkeypatch):
    """Resuming step 1 in place while step 2 exists would leave step 2 behind for the next --resume."""
    run = copy_run(finished_run, tmp_path)
    monkeypatch.setattr(models, "load_model", refuse_to_load)
    with pytest.raises(ValueError, match="later checkpoint.*--out"):
        cli(online_vpo, ["--resume", os.path.join(run, "checkpoints", "step-000001")])
    with pytest.raises(Loaded):  # into a new folder it is a fork
        cli(online_vpo, ["--resume", os.path.join(run, "checkpoints", "step-000001"), "--out", str(tmp_path / "fork")])
