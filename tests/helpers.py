import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(module, argv):
    """Parse argv with the script's own parser and call its main (the real entry point)."""
    return module.main(module.p.parse_args(argv))


def torchrun(script, argv, nproc=2, extra=()):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
           os.path.join(ROOT, "tests", "dist_run.py"), script, *extra, *argv]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    # (the first errors name the rank that failed first; the tail is usually the other rank's lost connection)
    first = "\n".join([line for line in res.stderr.splitlines() if "Error" in line][:12])
    assert res.returncode == 0, f"first errors:\n{first}\n...\n" + res.stdout[-3000:] + res.stderr[-5000:]
    return res


def single(script, argv, extra=()):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, RANK="0", WORLD_SIZE="1")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "dist_run.py"), script, *extra, *argv],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]


def load_rank(out, r):
    return torch.load(os.path.join(out, f"rank{r}.pt"))


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def final_params(out):
    import common
    state = torch.load(os.path.join(common.latest_checkpoint(out), "state.pt"), weights_only=False)
    return state["params"]


def assert_ranks_agree_with_one_process(script, argv, tmp_path, tol=1e-5, grad_rtol=1e-5, extra=(), ranks_only=()):
    """torchrun 2 ranks: identical weights on both, equal to one process on the union of the data; and every
    update's gradient after the cross-rank average equal to the single process's. The gradient check
    is what AdamW and clipping cannot hide (a sum over ranks not divided by the world size, or a per-rank
    mean where ranks hold uneven pair counts, changes the gradient but barely the AdamW update).
    `ranks_only`: flags for the torchrun run alone (e.g. --fsdp). Returns (rank-0 weights, single-process weights)."""
    torchrun(script, argv + list(ranks_only) + ["--out", str(tmp_path / "ddp")], extra=extra)
    r0, r1 = load_rank(str(tmp_path / "ddp"), 0), load_rank(str(tmp_path / "ddp"), 1)
    assert max_diff(r0, r1) == 0.0  # every rank holds the same weights
    single(script, argv + ["--out", str(tmp_path / "one")], extra=extra)
    one = load_rank(str(tmp_path / "one"), 0)
    assert max_diff(r0, one) < tol  # = one process on the union of the data
    g0, g1, g = (torch.load(os.path.join(str(tmp_path / f), f"grads{r}.pt")) for f, r in (("ddp", 0), ("ddp", 1), ("one", 0)))
    scale = max(x.abs().max().item() for x in g)
    assert scale > 0 and len(g0) == len(g) and max_diff(g0, g1) == 0.0
    assert max_diff(g0, g) <= grad_rtol * scale, (max_diff(g0, g), scale)
    return r0, one


def assert_model_card_matches(out, loader="load_lora_weights"):
    """The final LoRA's README.md: Hugging Face card metadata, and every before/after figure equal to the
    first and last evaluation rows of metrics.jsonl; its snippet loads the LoRA with `loader`."""
    import json
    import common
    card = open(os.path.join(common.latest_checkpoint(out), "lora", "README.md")).read()
    meta = card.split("---")[1]
    assert "base_model:" in meta and "library_name: diffusers" in meta and "tags: [lora" in meta
    evals = [r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if r.get("eval")]
    rows = {line.split("|")[1].strip(): line.split("|")[2:4] for line in card.splitlines()
            if line.startswith(("| eval/", "| train/"))}
    want = [k for k in evals[-1] if k.startswith(("eval/", "train/"))]
    assert sorted(rows) == sorted(want) and want
    for k in want:
        before, after = (float(v) for v in rows[k])
        assert before == evals[0][k] and after == evals[-1][k], k
    assert loader in card
    return card
