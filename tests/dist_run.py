"""Run an algorithm script's main() under torchrun and save THIS rank's trainable weights to
<out>/rank<r>.pt and the gradients of every update, AFTER the cross-rank average, to
<out>/grads<r>.pt, so a test can compare ranks with each other and with a single process.
    torchrun --nproc_per_node 2 tests/dist_run.py <script> [--no-grad-average] [--tie WORD] <script args...>
--no-grad-average replaces distributed.average_gradients by a no-op: the negative control proving the
test detects a loop that forgets to average gradients across ranks.
--tie WORD gives every video of a prompt containing WORD the same reward (0): its DPO pairs have no
margin and are skipped, so ranks hold uneven pair counts (or none) depending on their prompts.
--judge-alternates makes the toy judge answer yes, no, yes, no ...: RWR's --loss dpo gets (yes, no) pairs."""
import importlib
import os
import sys

import torch

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
torch.set_num_threads(1)
import common  # noqa: E402
import rewards  # noqa: E402
import toy_world  # noqa: E402
import distributed  # noqa: E402

script, argv = sys.argv[1], sys.argv[2:]
captured = {"grads": []}
average = distributed.average_gradients
if "--no-grad-average" in argv:
    argv.remove("--no-grad-average")
    average = lambda params, d: None  # noqa: E731


def recording_average(params, d):
    average(params, d)  # (under FSDP: the gradient shards, gathered whole; every rank calls this)
    captured["grads"] += [distributed.full(p.grad).detach().cpu().clone() if p.grad is not None else torch.zeros(p.shape)
                          for p in params]


distributed.average_gradients = recording_average
if "--tie" in argv:
    i = argv.index("--tie")
    word = argv.pop(i + 1)
    argv.pop(i)
    load = rewards.load_reward

    class Tied:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, videos, prompts):
            out = dict(self.inner(videos, prompts))
            tie = torch.tensor([word in p for p in prompts], device=out["reward"].device)
            out["reward"] = torch.where(tie, torch.zeros_like(out["reward"]), out["reward"])
            return out

    rewards.load_reward = lambda *a, **k: Tied(load(*a, **k))
if "--judge-alternates" in argv:  # the toy judge answers yes, no, yes, no ... in each call: (yes, no) pairs for DPO
    argv.remove("--judge-alternates")
    toy_world.ToyJudge.__call__ = lambda self, v, p: {"reward": (torch.arange(len(p)) % 2 == 0).float(),
                                                      "yes": (torch.arange(len(p)) % 2 == 0).float()}
_setup = common.setup_trainable


def capture(model, *a, **k):
    captured["model"] = model
    return _setup(model, *a, **k)


def trainable():  # read from the model: under FSDP the parameters are replaced by sharded ones
    return [distributed.full(p).detach().cpu() for den in captured["model"].experts for p in den.parameters() if p.requires_grad]


_destroy = torch.distributed.destroy_process_group


def destroy(*a, **k):  # gather sharded weights while the process group still exists
    captured["final"] = trainable()
    _destroy(*a, **k)


common.setup_trainable = capture
torch.distributed.destroy_process_group = destroy
mod = importlib.import_module(script)
args = mod.p.parse_args(argv)
rank = int(os.environ.get("RANK", 0))
out = mod.main(args)
torch.save(captured.get("final") or trainable(), os.path.join(out, f"rank{rank}.pt"))
torch.save(captured["grads"], os.path.join(out, f"grads{rank}.pt"))
