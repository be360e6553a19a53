"""Bad input fails early and clearly, and loses nothing (issue #31, section 3): each case below is refused
BEFORE the model loads (the loader is replaced by one that raises), with a message that names the flag, and
leaves no run folder behind."""
import os
import sys

import pytest

import common
import models
import gran_dpo
import online_vpo
import vader_grad
import vlm_feedback_rwr as rwr
from helpers import run_main

DPO_FAST = ["--batch-size", "2", "--num-candidates", "2", "--sample-steps", "2", "--num-eval-prompts", "2",
            "--lora-rank", "4", "--min-margin", "0", "--heldout-pairs", "2", "--recipe", "paper"]
SCRIPTS = {"online_vpo": online_vpo, "gran_dpo": gran_dpo, "vader_grad": vader_grad, "vlm_feedback_rwr": rwr}
STEPPED = ["online_vpo", "gran_dpo", "vader_grad"]  # (RWR counts rounds and evaluates after every one)


class Loaded(Exception):
    """Raised where the model would start loading."""


@pytest.fixture
def no_load(monkeypatch):
    def refuse(*a, **k):
        raise Loaded("the model started loading: the bad input was not caught before it")
    monkeypatch.setattr(models, "load_model", refuse)


def refused(script, argv, match, tmp_path, error=ValueError):
    out = tmp_path / "run"
    with pytest.raises(error, match=match) as e:
        run_main(SCRIPTS[script], argv + ["--out", str(out)])
    assert not os.path.exists(out), "a refused run left a folder behind"
    return str(e.value)


CASES = [(s, [flag, "0"], flag) for s in SCRIPTS for flag in ("--batch-size", "--sample-batch-size", "--height")]
CASES += [(s, [flag, "0"], flag) for s in STEPPED
          for flag in ("--num-eval-prompts", "--eval-every", "--save-every", "--steps")]
CASES += [("vlm_feedback_rwr", ["--rounds", "0"], "--rounds"), ("vlm_feedback_rwr", ["--rounds", "-1"], "--rounds")]
# settings that would train nothing
CASES += [("online_vpo", ["--num-candidates", "1"], "--num-candidates"),
          ("gran_dpo", ["--num-candidates", "1"], "--num-candidates"),
          ("vlm_feedback_rwr", ["--loss", "dpo", "--videos-per-prompt", "1"], "--videos-per-prompt")]
# script-specific input that used to fail mid-run
CASES += [("gran_dpo", ["--reward", "judge*0.5"], "--reward"),
          ("gran_dpo", ["--reward", "toy:quality+judge"], "--reward"),
          ("vader_grad", ["--backprop-mode", "specific", "--backprop-start", "50"], "--backprop-start"),
          ("vader_grad", ["--backprop-mode", "specific", "--backprop-start", "-1"], "--backprop-start"),
          ("vlm_feedback_rwr", ["--question", "Does {prompt} look {style}? Answer yes or no."], "--question")]


@pytest.mark.parametrize("script,argv,flag", CASES, ids=[f"{s}{' '.join(a)}" for s, a, _ in CASES])
def test_bad_values_are_refused_before_loading(tmp_path, no_load, script, argv, flag):
    message = refused(script, argv, flag, tmp_path)
    assert "ZeroDivision" not in message and len(message) > len(flag) + 20  # a sentence that says what to do


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_prompt_file_that_is_not_utf8_is_named(tmp_path, no_load, script):
    bad = tmp_path / "prompts.txt"
    bad.write_bytes("a red square falling\n".encode() + b"caf\xe9 au lait\n")
    message = refused(script, ["--prompts", str(bad)], "--prompts", tmp_path)
    assert str(bad) in message and "UTF-8" in message


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flag", ["--prompts", "--eval-prompts"])
def test_toy_prompts_outside_the_grammar_are_refused_up_front(tmp_path, no_load, script, flag):
    bad = tmp_path / "prompts.txt"
    bad.write_text("a red square falling\na cat playing piano\n")
    message = refused(script, [flag, str(bad)], flag, tmp_path)
    assert "a cat playing piano" in message


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_unwritable_out_is_refused_before_loading(tmp_path, no_load, monkeypatch, script):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(ValueError, match="--out"):  # a folder inside a file
        run_main(SCRIPTS[script], ["--out", str(tmp_path / "a_file" / "run")])
    locked = tmp_path / "read_only"
    locked.mkdir()
    real_access = os.access  # (tests run as root, whom file modes do not stop: the permission is simulated)
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if str(p).startswith(str(locked)) else real_access(p, mode, **k))
    with pytest.raises(ValueError, match="--out"):
        run_main(SCRIPTS[script], ["--out", str(locked / "sub" / "run")])
    assert os.listdir(locked) == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_track_without_wandb_is_refused_before_loading(tmp_path, no_load, monkeypatch, script):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError, as where it is not installed
    message = refused(script, ["--track"], "--track", tmp_path)
    assert "pip install wandb" in message


def test_a_truncated_checkpoint_is_named_before_loading(tmp_path, toy_model, monkeypatch):
    out = str(tmp_path / "run")
    run_main(online_vpo, DPO_FAST + ["--steps", "2", "--save-every", "1", "--out", out])
    state = os.path.join(common.latest_checkpoint(out), "state.pt")
    with open(state, "r+b") as f:
        f.truncate(os.path.getsize(state) // 2)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: (_ for _ in ()).throw(Loaded()))
    with pytest.raises(ValueError, match="state.pt") as e:
        run_main(online_vpo, ["--resume", out, "--steps", "3"])
    assert state in str(e.value) and "step-000001" in str(e.value)  # names the file, and the earlier checkpoint
