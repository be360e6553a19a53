"""Run under `torchrun --nproc_per_node 4 tests/cp_mesh.py <folder>`: distributed.setup_distributed(cp=2) on 4
ranks; each rank writes what it sees (data rank and size, the data group's gather and mean, and the gradient
average_gradients leaves of a parameter whose gradient is the global rank + 1) to <folder>/rank<r>.json."""
import json
import os
import sys

import torch

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
import distributed  # noqa: E402

d = distributed.setup_distributed(None, cp=2)
p = torch.nn.Parameter(torch.zeros(1))
p.grad = torch.full((1,), float(d.global_rank + 1))
distributed.average_gradients([p], d)
row = {"rank": d.rank, "world": d.world, "cp": d.cp, "main": d.main, "grad": p.grad.item(),
       "gathered": distributed.all_gather_tensor(torch.tensor([float(d.rank)]), d).tolist(),
       "mean": distributed.all_mean({"x": float(d.rank)}, d)["x"]}
with open(os.path.join(sys.argv[1], f"rank{d.global_rank}.json"), "w") as f:
    json.dump(row, f)
torch.distributed.destroy_process_group()
