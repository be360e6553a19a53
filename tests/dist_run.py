"""Run an algorithm script's main() under torchrun and save THIS rank's trainable weights to
<out>/rank<r>.pt, so a test can compare ranks with each other and with a single process.
    torchrun --nproc_per_node 2 tests/dist_run.py <script> [--no-grad-average] <script args...>
--no-grad-average replaces common.average_gradients by a no-op: the negative control proving the
test detects a loop that forgets to average gradients across ranks."""
import importlib
import os
import sys

import torch

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
torch.set_num_threads(1)
import common  # noqa: E402

script, argv = sys.argv[1], sys.argv[2:]
if "--no-grad-average" in argv:
    argv.remove("--no-grad-average")
    common.average_gradients = lambda params, d: None
captured = {}
_setup = common.setup_trainable


def capture(*a, **k):
    captured["params"] = _setup(*a, **k)
    return captured["params"]


common.setup_trainable = capture
mod = importlib.import_module(script)
args = mod.p.parse_args(argv)
rank = int(os.environ.get("RANK", 0))
out = mod.main(args)
torch.save([p.detach().cpu() for p in captured["params"]], os.path.join(out, f"rank{rank}.pt"))
