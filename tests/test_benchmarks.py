"""Smoke runs of the benchmark scripts (the full runs take hours: README, Results): the plumbing from
command line to JSON and PNG works, and the figures they report are computed from the runs."""
import json
import os
import shutil
import subprocess
import sys

from helpers import ROOT


def test_claims_smoke_writes_figures_and_verdicts(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "claims.py"), "--smoke", "--only", "online_vs_offline",
           "gran_vs_video_dpo", "--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs")]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    for name in ("online_vs_offline", "gran_vs_video_dpo"):
        fig = json.load(open(tmp_path / "out" / f"{name}.json"))
        assert os.path.getsize(tmp_path / "out" / f"{name}.png") > 1000
        assert fig["command"] == f"python benchmarks/claims.py --only {name}" and fig["verdict"]
        assert all(v == "one seed: no interval to judge by" for v in fig["verdict"].values())
    fig = json.load(open(tmp_path / "out" / "online_vs_offline.json"))
    # the reported change is the run's own last minus first held-out evaluation
    rows = [json.loads(line) for line in open(tmp_path / "runs" / "dpo_offline_s0" / "metrics.jsonl")]
    evals = [r for r in rows if r.get("eval")]
    assert abs(fig["per_seed"]["dpo_offline"]["delta/reward"][0] - (evals[-1]["eval/reward"] - evals[0]["eval/reward"])) < 1e-9
    # a second call finds the runs finished and starts none, even on a fresh machine without the run folders:
    # the kept figures (<out>/runs, committed) are enough, and the verdicts come out the same
    shutil.rmtree(tmp_path / "runs")
    before = {n: json.load(open(tmp_path / "out" / f"{n}.json"))["per_seed"] for n in ("online_vs_offline", "gran_vs_video_dpo")}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "already done" in res.stdout and "done (" not in res.stdout.replace("already done", "")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    for n, per_seed in before.items():
        assert json.load(open(tmp_path / "out" / f"{n}.json"))["per_seed"] == per_seed


def test_claim_verdicts_come_from_the_paired_difference_interval():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import claims
    # diffs 1, 2, 3: mean 2, sd 1, t(2 dof) = 4.303, half-width 4.303 / sqrt(3) = 2.484 -> the interval spans 0
    m, lo, hi = claims.paired_ci([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    assert abs(m - 2) < 1e-12 and abs(lo - (2 - 4.303 / 3 ** 0.5)) < 1e-9 and abs(hi - (2 + 4.303 / 3 ** 0.5)) < 1e-9
    assert claims.verdict([1.0, 2.0, 3.0], [0.0] * 3).startswith("inconclusive")
    # seeds spread widely but the pairs agree: the paired difference is tight (the unpaired spread would hide it)
    a, b = [0.1, 0.5, 0.9], [0.02, 0.41, 0.83]
    assert claims.verdict(a, b).startswith("held (+0.080")
    assert claims.verdict(b, a).startswith("not held")
    assert claims.verdict(a, b, more_is_better=False).startswith("not held")
    assert claims.verdict([0.1], [0.0]) == "one seed: no interval to judge by"
    # a claim made of parts: one seed stays one seed (and so never asks for more seeds), else every part must hold
    one = {c: {"delta/reward": [0.1]} for c in ("dpo", "dpo_ref_3", "dpo_ref_never", "dpo_ref_20")}
    assert set(claims.judge_claim("ref_interval", one).values()) == {"one seed: no interval to judge by"}
    three = {"dpo": [0.3, 0.5, 0.7], "dpo_ref_20": [0.0, 0.1, 0.2], "dpo_ref_3": [0.2, 0.41, 0.59],
             "dpo_ref_never": [0.25, 0.44, 0.66]}
    got = claims.judge_claim("ref_interval", {c: {"delta/reward": v} for c, v in three.items()})
    assert got["interior optimum (dpo beats I=3 and never)"].startswith("held: vs I=3 held (+0.100")
    three["dpo_ref_3"] = [0.4, 0.6, 0.8]  # I=3 now beats I=10 on every seed
    got = claims.judge_claim("ref_interval", {c: {"delta/reward": v} for c, v in three.items()})
    assert got["interior optimum (dpo beats I=3 and never)"].startswith("not held: ")


def test_performance_smoke(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "performance.py"), "--model", "tiny-wan", "--algorithms",
           "vader_grad", "--steps", "1", "--out", str(tmp_path / "perf.json")]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    out = json.load(open(tmp_path / "perf.json"))
    run = out["runs"][0]
    assert run["algorithm"] == "vader_grad" and run["sec_per_step"] > 0 and 0 < run["inside_compute_frac"] <= 1
    assert abs(run["sampling_s"] + run["reward_s"] + run["update_s"] - run["sec_per_step"]) < 1e-6
    assert out["sampler_vs_stock"]["ours_videos_per_s"] > 0 and out["sampler_vs_stock"]["stock_videos_per_s"] > 0


def test_claims_readme_section_is_assembled_from_the_saved_results(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import argparse
    import claims
    out = tmp_path / "out"
    out.mkdir()
    (out / "intro.md").write_text("INTRO\n")
    for i, n in enumerate(claims.EXPERIMENTS):
        (out / f"{n}.json").write_text(json.dumps({"verdict": {f"part of {n}": f"held (+0.{i}00)"}}))
        (out / f"{n}.md").write_text(f"TABLE {n}\n")
    (out / "rwr_vs_dpo.notes.md").write_text("WHAT RWR DID\n")
    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- claims:start -->\nold claims\n<!-- claims:end -->\nafter\n")
    claims.readme(argparse.Namespace(out=str(out)), path=str(readme))
    text = readme.read_text()
    assert text.startswith("before\n<!-- claims:start -->\n") and text.endswith("<!-- claims:end -->\nafter\n")
    assert "old claims" not in text and "INTRO" in text and "WHAT RWR DID" in text
    assert "| 8. rwr_vs_dpo | part of rwr_vs_dpo | held (+0.700) |" in text
    # each experiment: heading, its table, its notes if any, its plot, in the sweep's order
    sec = text[text.index("### 8."):]
    assert sec.index("TABLE rwr_vs_dpo") < sec.index("WHAT RWR DID") < sec.index("![rwr_vs_dpo]")
    assert [text.index(f"TABLE {n}") for n in claims.EXPERIMENTS] == sorted(text.index(f"TABLE {n}") for n in claims.EXPERIMENTS)
    # an experiment added after the sweep (no JSON yet) is listed as not run, not a crash
    os.remove(out / "no_dominant_method.json")
    claims.readme(argparse.Namespace(out=str(out)), path=str(readme))
    text = readme.read_text()
    assert "| 9. no_dominant_method |" in text and "not run yet: `python benchmarks/claims.py --only " \
        "no_dominant_method`" in text and "TABLE no_dominant_method" not in text and "TABLE rwr_vs_dpo" in text


def _fake_run(folder, dims=("visual_quality", "temporal_consistency", "dynamic_degree", "text_alignment", "physics",
                            "color_accuracy", "reward")):
    """A finished run's folder as the scripts leave it: two held-out evaluations, its config, its seconds."""
    os.makedirs(folder)
    rows = [{"step": 0, "eval": True} | {f"eval/{k}": 0.5 for k in dims},
            {"step": 10, "loss": 0.6}, {"step": 10, "eval": True} | {f"eval/{k}": 0.6 for k in dims}]
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    json.dump({"batch_size": 4, "num_candidates": 4}, open(os.path.join(folder, "config.json"), "w"))
    open(os.path.join(folder, "done"), "w").write("12.0\n")


def test_kept_runs_count_only_under_their_configuration_and_diversity_stays_in_its_experiment(tmp_path, monkeypatch):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import argparse
    import claims
    args = argparse.Namespace(smoke=False, runs=str(tmp_path / "runs"), keep=str(tmp_path / "kept"), out=str(tmp_path))
    monkeypatch.setattr(claims, "diversity", lambda out, seed: 0.25)  # (the real one samples the run's final weights)
    for c in ("dpo", "dpo_offline", "vader"):
        _fake_run(tmp_path / "runs" / f"{c}_s0")
        claims.keep_run(c, 0, str(tmp_path / "runs" / f"{c}_s0"), args)
        assert claims.is_kept(c, 0, args)
    # only the gradient-vs-DPO pair keeps and reports diversity; other experiments' tables do not grow a column
    assert sorted(os.listdir(tmp_path / "kept" / "vader_s0")) == ["config.json", "diversity.json", "done", "flags.json",
                                                                  "metrics.jsonl"]
    assert not os.path.exists(tmp_path / "kept" / "dpo_offline_s0" / "diversity.json")
    _, figs, _, _ = claims.summarise("gradient_vs_dpo", claims.finished_runs(["vader", "dpo"], args), args)
    assert figs["vader"]["diversity"] == [0.25] and figs["dpo"]["diversity"] == [0.25]
    _, figs, _, _ = claims.summarise("online_vs_offline", claims.finished_runs(["dpo", "dpo_offline"], args), args)
    assert "diversity" not in figs["dpo"] and abs(figs["dpo"]["delta/reward"][0] - 0.1) < 1e-9
    # a changed configuration makes its kept runs stale: not counted, so run again
    monkeypatch.setitem(claims.CONFIGS, "dpo_offline", claims.CONFIGS["dpo_offline"] | {"--lr": 5e-4})
    assert not claims.is_kept("dpo_offline", 0, args) and claims.is_kept("dpo", 0, args)
    assert claims.finished_runs(["dpo", "dpo_offline"], args) == {"dpo": [], "dpo_offline": []}


def test_claims_smoke_refuses_the_committed_results_folder():
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "claims.py"), "--smoke"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "give it its own --out" in res.stderr


def test_the_kept_claims_runs_are_not_git_ignored():
    if not os.path.isdir(os.path.join(ROOT, ".git")):
        import pytest
        pytest.skip("not a git checkout")
    res = subprocess.run(["git", "check-ignore", "-q", "benchmarks/results/claims/runs/dpo_s0/done"], cwd=ROOT)
    assert res.returncode == 1  # 1: not ignored (0 would be ignored)


def test_toy_scores_judge_if_shape_checked_fails_the_wrong_shape():
    """The shipped judge ignores shape; the diagnostic pass rate must fail a clip whose object has the wrong one."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import toy_scores
    import toy_world
    drawn = ["a red circle falling", "a blue square moving right"]
    asked = ["a red square falling", "a blue circle moving right"]  # same colours and motions, shapes swapped
    s = toy_scores.score(toy_world.render(drawn * 2, seed=1), asked * 2)
    assert s["judge_pass_rate_dynamics"] == 1.0  # motion, physics and colour are right
    assert s["judge_pass_rate_dynamics_if_shape_checked"] == 0.0
    s = toy_scores.score(toy_world.render(drawn * 2, seed=1), drawn * 2)
    assert s["judge_pass_rate_dynamics_if_shape_checked"] == 1.0


def test_a_kept_claims_run_goes_stale_when_the_base_changes(tmp_path, monkeypatch):
    # kept runs record the base's weights: after a new base, the sweep reruns them instead of reusing old figures
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import argparse
    import claims
    args = argparse.Namespace(keep=str(tmp_path / "keep"), smoke=False)
    run = tmp_path / "run"
    run.mkdir()
    for f in ("metrics.jsonl", "config.json", "done"):
        (run / f).write_text("{}\n")
    real = claims.base_fingerprint
    monkeypatch.setattr(claims, "base_fingerprint", lambda: "aaaaaaaaaaaa")
    claims.keep_run("dpo_n2", 0, str(run), args)
    assert claims.is_kept("dpo_n2", 0, args) and not claims.is_kept("dpo_n2", 1, args)
    monkeypatch.setattr(claims, "base_fingerprint", lambda: "bbbbbbbbbbbb")
    assert not claims.is_kept("dpo_n2", 0, args)
    assert len(real()) == 12 and real() == real.__wrapped__()  # the real one: the shipped weights' hash


def test_paired_gains_by_hand(tmp_path):
    """benchmarks/paired_gains.py: gains end minus step 0 per run, their mean and the t interval (2 runs: t = 12.706,
    gains 0.01 and 0.03: mean 0.02, sd 0.01414, half-width 12.706 x 0.01414 / sqrt 2 = 0.1271)."""
    for i, (a, b) in enumerate([(0.80, 0.81), (0.70, 0.73)]):
        (tmp_path / f"r{i}").mkdir()
        rows = [{"step": 0, "eval": True, "eval/reward": a}, {"step": 1, "loss": 0.5},
                {"step": 60, "eval": True, "eval/reward": b}]
        (tmp_path / f"r{i}" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "paired_gains.py"), str(tmp_path / "r0"),
                          str(tmp_path / "r1")], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "| reward | +0.0200 [-0.1071, +0.1471] |" in res.stdout, res.stdout


def test_no_dominant_method_verdict():
    """benchmarks/claims.py's new experiment: every pair of the four methods on the trained dimension's paired gain;
    the claim fails when one method's gain is above each other's (its paired intervals above zero), holds otherwise."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import claims
    gains = {"dpo": [0.30, 0.50, 0.70], "grpo_480": [0.0, 0.1, 0.2], "vader_480": [0.05, 0.12, 0.22],
             "rwr_480": [0.01, 0.09, 0.21]}
    figs = lambda g: {c: {"delta/temporal_consistency": v} for c, v in g.items()}  # noqa: E731
    got = claims.judge_claim("no_dominant_method", figs(gains))
    assert len(got) == 7 and got["online DPO vs GRPO: trained reward gain, online DPO minus GRPO"].startswith("held")
    assert got["no method beats all three others"] == "not held: online DPO beats every other"
    gains["vader_480"] = [0.31, 0.52, 0.69]  # VADER now ties DPO: nobody beats all three
    got = claims.judge_claim("no_dominant_method", figs(gains))
    assert got["no method beats all three others"].startswith("held")
    one = claims.judge_claim("no_dominant_method", figs({c: v[:1] for c, v in gains.items()}))
    assert one["no method beats all three others"] == "one seed: no interval to judge by"


def test_grpo_gradient_signal_smoke(tmp_path):
    """The plumbing: two rows (one noise per video / per group), a cosine per pair of rollouts, in [-1, 1]."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import grpo_gradient_signal
    rows = grpo_gradient_signal.main(grpo_gradient_signal.p.parse_args(["--smoke", "--threads", "1",
                                                                          "--out", str(tmp_path / "s.json")]))
    assert [r["initial_noise"] for r in rows] == ["one per video", "one per group"]
    assert all(len(r["cosines"]) == 1 and -1 <= r["cosines"][0] <= 1 and r["group_reward_std"] >= 0 for r in rows)
    assert json.load(open(tmp_path / "s.json"))["results"] == rows


def test_a_claims_table_keeps_its_columns_when_a_configuration_has_no_trained_reward():
    """RWR scores with a judge: its row has no 'delta/reward', and its cells must not shift one column left."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import claims
    stats = {"dpo": {"delta/reward": [0.01, 0.002], "delta/visual_quality": [0.0, 0.001], "sec": [400.0, 1.0]},
             "rwr_480": {"delta/visual_quality": [-0.003, 0.001], "sec": [700.0, 1.0]}}
    text = claims.markdown("no_dominant_method", {"mean_std": stats, "seeds": [0, 1], "command": "c", "verdict": {}})
    head, _, dpo, rwr = [line for line in text.splitlines() if line.startswith("|")]
    assert head.count("|") == dpo.count("|") == rwr.count("|")
    assert rwr.split("|")[2].strip() == "-" and rwr.split("|")[3].strip() == "-0.003 ± 0.001"
