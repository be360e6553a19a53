"""The LoRA's model card and every script's --help (issue #31, section 5): the card's snippet runs as written,
`base_model` is a hub id or absent, the held-out prompt count is stated; --help prints each default once."""
import json
import os
import re

import pytest
import torch
import yaml

import common
import models
import gran_dpo
import online_vpo
import toy_world
import vader_grad
import vlm_feedback_rwr as rwr
from helpers import run_main

FAST = ["--batch-size", "2", "--num-candidates", "2", "--sample-steps", "2", "--num-eval-prompts", "3",
        "--lora-rank", "4", "--min-margin", "0", "--heldout-pairs", "2"]
SCRIPTS = [online_vpo, gran_dpo, vader_grad, rwr]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, toy_model):
    out = str(tmp_path_factory.mktemp("card") / "run")
    run_main(online_vpo, FAST + ["--steps", "1", "--recipe", "paper", "--out", out])
    return out


def card_of(out):
    lora = os.path.join(common.latest_checkpoint(out), "lora")
    text = open(os.path.join(lora, "README.md")).read()
    return lora, text, yaml.safe_load(text.split("---")[1])


def test_the_cards_snippet_runs_as_written(toy_run):
    lora, card, _ = card_of(toy_run)
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    scope = {}
    exec(snippet.replace("path/to/this/folder", lora), scope)  # nothing but the card's own text (and imports)
    pipe = scope["pipe"]
    assert pipe.get_active_adapters() and any("lora" in n for n, _ in pipe.transformer.named_parameters())
    trained = {k: v for k, v in torch.load(os.path.join(common.latest_checkpoint(toy_run), "state.pt"),
                                           weights_only=False).items() if k == "params"}["params"]
    loaded = [p for n, p in pipe.transformer.named_parameters() if "lora" in n]
    assert len(loaded) == len(trained)


def test_base_model_is_a_hub_id_or_absent_and_the_heldout_count_is_stated(toy_run, tmp_path):
    _, card, meta = card_of(toy_run)
    assert "base_model" not in meta  # a local folder is no hub id: the field is left out ...
    assert models.TOY_PATH in card  # ... and the text names the local model
    assert "3 held-out prompts" in card
    # a run of a hub model: base_model is its hub id (the card is written from the run's files alone)
    run = tmp_path / "hub"
    lora = run / "checkpoints" / "step-000001" / "lora"
    lora.mkdir(parents=True)
    cfg = json.load(open(os.path.join(toy_run, "config.json"))) | {"model": "wan2.1-1.3b", "family": "wan",
                                                                   "model_path": "/cache/models--Wan-AI--x/snapshots/1"}
    (run / "config.json").write_text(json.dumps(cfg))
    (run / "metrics.jsonl").write_text(open(os.path.join(toy_run, "metrics.jsonl")).read())
    models.write_model_card(str(run), "online_vpo", "OnlineVPO", "arXiv 2412.15159", 8)
    _, card, meta = card_of(str(run))
    assert meta["base_model"] == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    assert 'from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers"' in card


@pytest.mark.parametrize("module", SCRIPTS, ids=lambda m: m.__name__)
def test_help_prints_each_default_once_and_says_what_resume_and_track_do(module):
    text = module.p.format_help()
    assert "(default: None)" not in text
    formatter = module.p._get_formatter()
    for action in module.p._actions:
        if action.help:
            helped = formatter._expand_help(action)  # the help text with whatever the formatter appends
            assert helped.lower().count("default") <= 1, (action.option_strings, helped)
    flat = " ".join(text.split())
    for name in toy_world.PROMPT_LISTS:  # the built-in prompt lists are named
        assert name in flat, name
    resume = " ".join(module.p._option_string_actions["--resume"].help.split())
    assert "restores" in resume and "weights" in resume and "configuration" in resume
    assert "wandb" in module.p._option_string_actions["--track"].help
