"""Run under `torchrun --nproc_per_node 2 tests/cp_denoiser.py <out.json> <family>=<folder> ...`: each family's
denoiser loaded twice through the production path, plainly and with --cp 2 (diffusers' Ulysses attention over both
ranks), the same LoRA weights in both; one forward and backward of a fixed loss. Writes, per family, the largest
difference of the output and of every LoRA gradient (the context group's gradients summed, as
distributed.average_gradients does) from the plain model's, relative to the largest entry."""
import json
import os
import sys

import torch

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
torch.set_num_threads(1)
import common  # noqa: E402
import distributed  # noqa: E402
import models  # noqa: E402

SIZE = {"wan": (9, 32, 32), "wan_a14b": (9, 32, 32)}  # latent 3 x 4 x 4, 2x2 patches: 12 tokens
out_file, pairs = sys.argv[1], [a.split("=", 1) for a in sys.argv[2:]]
d = distributed.setup_distributed(None, cp=2)
result = {}
for family, folder in pairs:
    runs = []
    for mesh in (None, d.mesh):
        model = models.load_model(folder, context_mesh=mesh)
        params = common.setup_trainable(model, 4)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in params:  # LoRA's B starts at zero: random weights, so that every LoRA matrix has a gradient
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        x = torch.randn((2,) + model.latent_shape(*SIZE[family]), generator=g)
        t = torch.tensor([900.0, 250.0])
        emb, mask = model.encode_prompts(["a red square falling", "a blue circle"])
        y = model.denoise(x, t, emb, mask)  # (Wan 2.2 A14B: t 900 goes to the high-noise expert, 250 to the other)
        (y * torch.randn(y.shape, generator=g)).sum().backward()
        grads = [p.grad.clone() for p in params]
        if mesh is not None:
            for gr in grads:
                torch.distributed.all_reduce(gr)  # the context group's token shares sum to the video's gradient
        _, video = common.sample(model, ["a red square falling"], [7], *SIZE[family], steps=2, guidance=3.0)
        runs.append((y.detach(), grads, video))
    (y0, g0, v0), (y1, g1, v1) = runs
    gscale = max(a.abs().max().item() for a in g0)
    result[family] = {"out": (y1 - y0).abs().max().item() / y0.abs().max().item(), "grad_scale": gscale,
                      "grad": max((a - b).abs().max().item() for a, b in zip(g1, g0)) / gscale,
                      "n_grads": len(g0), "sample": (v1 - v0).abs().max().item(), "sample_sum": v1.sum().item()}
with open(out_file.replace(".json", f".rank{d.global_rank}.json"), "w") as f:
    json.dump(result, f)
torch.distributed.destroy_process_group()
