"""Documented commands never overwrite committed files (issue #31): `python pretrain_toy.py --steps 2` and
`python benchmarks/memory_plan.py --smoke` write under runs/ by default; writing into the shipped assets/toy
or benchmarks/results/memory_plan.json takes an explicit --overwrite (and a --smoke plan never goes there),
as benchmarks/claims.py refuses a --smoke run into its shipped results.
Every check here that points a script at a shipped path stops it before it trains or plans (or runs a copy
of the script in a throwaway root), so even a broken guard cannot touch the repository's files."""
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch

import models
import pretrain_toy
from helpers import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = os.path.join(ROOT, "runs")
PLAN = os.path.join(ROOT, "benchmarks", "results", "memory_plan.json")
TINY = ["--batch-size", "2", "--num-frames", "4", "--size", "16", "--threads", "1", "--heads", "2", "--head-dim", "32",
        "--layers", "1", "--ffn-dim", "64"]


def digest(path):
    """{relative path: sha256} of a file or of every file in a folder."""
    files = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    return {os.path.relpath(f, path): hashlib.sha256(open(f, "rb").read()).hexdigest() for f in sorted(files)}


def under(path, folder):
    return os.path.realpath(path).startswith(os.path.realpath(folder) + os.sep)


class Reached(Exception):
    """Raised by a stub where the script would start its real work."""


def stop(*a, **k):
    raise Reached


# ---- pretrain_toy.py ------------------------------------------------------------------------------
def test_pretrain_toy_writes_under_runs_by_default():
    defaults = pretrain_toy.p.parse_args([])
    assert under(defaults.out, RUNS), defaults.out
    assert defaults.ckpt is None  # so the checkpoint goes beside --out: runs/toy_pretrain_ckpt.pt


@pytest.mark.parametrize("argv", [["--out", "assets/toy"], ["--out", models.TOY_PATH], ["--out", models.TOY_PATH + "/"]])
def test_pretrain_toy_refuses_to_overwrite_shipped_files(argv, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(pretrain_toy, "build_components", stop)  # past the guard: stopped before anything is written
    before = digest(models.TOY_PATH)
    if "--out" not in argv:
        argv = argv + ["--out", str(tmp_path / "toy")]
    with pytest.raises(SystemExit, match="--overwrite") as e:
        run_main(pretrain_toy, TINY + ["--steps", "2"] + argv)
    assert "shipped" in str(e.value) and "runs/" in str(e.value), e.value
    assert digest(models.TOY_PATH) == before
    assert torch.get_num_threads() == 1
    monkeypatch.setattr(pretrain_toy, "build_components", stop)
    with pytest.raises(Reached):  # the explicit flag lets it through
        run_main(pretrain_toy, TINY + ["--steps", "2", "--overwrite"] + argv)


def test_pretrain_toy_overwrite_flag_replaces_a_shipped_folder(monkeypatch, tmp_path):
    shipped = tmp_path / "assets"
    monkeypatch.setattr(pretrain_toy, "SHIPPED", [str(shipped)])
    (shipped / "toy").mkdir(parents=True)
    (shipped / "toy" / "model_index.json").write_text("{}")
    with pytest.raises(SystemExit, match="--overwrite"):
        run_main(pretrain_toy, TINY + ["--steps", "1", "--out", str(shipped / "toy")])
    assert os.listdir(shipped / "toy") == ["model_index.json"] and not os.path.exists(shipped / "toy_pretrain_ckpt.pt")
    run_main(pretrain_toy, TINY + ["--steps", "1", "--out", str(shipped / "new")])  # a new folder overwrites nothing
    assert os.path.exists(shipped / "toy_pretrain_ckpt.pt")  # the script's own (git-ignored) checkpoint is no shipped file
    run_main(pretrain_toy, TINY + ["--steps", "1", "--out", str(shipped / "new2"), "--ckpt", str(shipped / "toy_pretrain_ckpt.pt")])
    run_main(pretrain_toy, TINY + ["--steps", "1", "--out", str(shipped / "toy"), "--overwrite"])
    assert models.load_model(str(shipped / "toy")).denoiser.config.num_layers == 1


def test_the_documented_smoke_command_leaves_the_shipped_base_alone(tmp_path):
    """`python pretrain_toy.py --steps 2`, run by a copy of the script in a throwaway root holding a copy of
    assets/toy: the copy is untouched, the run lands in <root>/runs/toy."""
    shutil.copy(os.path.join(ROOT, "pretrain_toy.py"), tmp_path / "pretrain_toy.py")
    shutil.copytree(models.TOY_PATH, tmp_path / "assets" / "toy")
    before = digest(tmp_path / "assets")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "pretrain_toy.py", "--steps", "2"] + TINY, cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert digest(tmp_path / "assets") == before
    assert os.path.exists(tmp_path / "runs" / "toy" / "transformer") and os.path.exists(tmp_path / "runs" / "toy_pretrain_ckpt.pt")


# ---- benchmarks/memory_plan.py --------------------------------------------------------------------
@pytest.fixture
def memory_plan():
    spec = importlib.util.spec_from_file_location("memory_plan_under_test", os.path.join(ROOT, "benchmarks", "memory_plan.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_memory_plan_writes_under_runs_by_default(memory_plan):
    assert under(memory_plan.p.get_default("out"), RUNS), memory_plan.p.get_default("out")


def test_the_documented_smoke_command_writes_under_runs(memory_plan, monkeypatch):
    """`python benchmarks/memory_plan.py --smoke`, its work stubbed: every save goes under runs/."""
    saved = []
    row = {"ranks": 1, "fsdp": False, "peak_gib": 0.0, "after_step_gib": {}, "expected_gib": {}}
    monkeypatch.setattr(memory_plan, "validate_tiny", lambda: [])
    monkeypatch.setattr(memory_plan, "plan_row", lambda *a, **k: dict(row))
    monkeypatch.setattr(memory_plan, "save", lambda path, result: saved.append(path))
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: None)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    memory_plan.main(memory_plan.p.parse_args(["--smoke"]))
    assert saved and all(under(s, RUNS) for s in saved), saved


@pytest.mark.parametrize("argv", [["--smoke", "--out", PLAN], ["--smoke", "--out", PLAN, "--overwrite"], ["--out", PLAN],
                                  ["--smoke", "--out", os.path.relpath(PLAN, ROOT)]])
def test_memory_plan_refuses_to_overwrite_the_shipped_plan(argv, memory_plan, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(memory_plan, "validate_tiny", stop)  # where a smoke run starts its work
    monkeypatch.setattr(torch.distributed, "init_process_group", stop)  # where a full plan starts its work
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    before = digest(PLAN)
    with pytest.raises(SystemExit, match="runs/") as e:
        memory_plan.main(memory_plan.p.parse_args(argv))
    assert ("--smoke" in argv) == ("plumbing" in str(e.value)) and ("--smoke" in argv or "--overwrite" in str(e.value))
    assert digest(PLAN) == before


def test_memory_plan_overwrite_flag_extends_the_shipped_plan_and_report_reads_it(memory_plan, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.distributed, "init_process_group", stop)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    with pytest.raises(Reached):  # past the guard: the full plan resumes from the shipped rows
        memory_plan.main(memory_plan.p.parse_args(["--out", PLAN, "--overwrite"]))
    before = digest(PLAN)
    shipped = memory_plan.main(memory_plan.p.parse_args(["--report", "--out", PLAN]))  # reading needs no flag
    assert len(shipped["rows"]) > 100 and "| model |" in capsys.readouterr().out
    memory_plan.p.set_defaults(out=str(tmp_path / "runs" / "memory_plan.json"))  # (this test's own copy of the module)
    assert memory_plan.main(memory_plan.p.parse_args(["--report"])) == shipped  # nothing planned yet: the shipped plan
    assert "benchmarks/results/memory_plan.json" in capsys.readouterr().out and digest(PLAN) == before
