"""Multi-GPU plumbing: torchrun set-up, gradient averaging, FSDP2 sharding and sharded checkpoints, offload.

Imports only torch. The loops call it explicitly, in the order the algorithm runs:
  d = distributed.setup_distributed(args.device, args.cp)  # torchrun's RANK / WORLD_SIZE / LOCAL_RANK; --cp's mesh
  params = distributed.shard(model, ...)           # --fsdp: FSDP2 on every block, then on each denoiser
  distributed.average_gradients(params, d)         # after backward (a no-op under FSDP2, which reduce-scatters)

FSDP2 (`--fsdp`): `shard` applies `torch.distributed.fsdp.fully_shard` to every transformer block, then to the
root, of each denoiser (both experts of Wan 2.2 A14B), with FSDP2's mixed-precision policy: compute in the
autocast dtype, gradients reduced in fp32. The trainable weights (LoRA, or all for a full fine-tune), their
gradients, AdamW's state and the DPO reference's copy are all sharded: no rank holds a full copy of any of them.
FSDP2 reduce-scatters the MEAN gradient over ranks, so the explicit `average_gradients` is skipped for sharded
parameters. Text encoder, VAE and reward stay replicated (frozen, bf16 under --mixed-precision bf16).

Context parallelism (`--cp N`): the world is a 2-D mesh, (data, context) = (WORLD_SIZE / N, N); the N ranks of a
context group hold the SAME videos (same prompts, same seeds) and split each video's tokens inside the denoiser
with diffusers' own Ulysses attention (`models.load_model(..., context_mesh=d.mesh)`). So `Dist.rank` and
`Dist.world` are the DATA-parallel rank and size (what the loops shard prompts and average over), `global_rank`
the process's torchrun rank. After backward each member of a context group holds the gradient of its own tokens:
the true gradient is their SUM, hence `average_gradients` sums over every rank and divides by the data size only.

Every rank must run the same number of denoiser forwards and backwards (each is a collective): the scripts pad
evaluations to equal counts and, under FSDP, a DPO rank whose pairs were all filtered still runs them with
weight 0. Checkpoints: `torch.distributed.checkpoint` (each rank writes its shards of trainable weights,
optimizer state and the reference), the LoRA gathered and written by rank 0 in the diffusers format the stock
pipeline loads.
"""
import dataclasses
import os

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


# ----------------------------------------------------------------------------------------------
# torchrun: the process group, gradient averaging, collectives for logging
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Dist:
    rank: int = 0  # data-parallel rank: which share of each batch this process samples and trains on
    world: int = 1  # data-parallel size: how many shares (= torchrun's WORLD_SIZE without --cp)
    device: str = "cpu"
    cp: int = 1  # --cp: ranks of one context group, which share each video's tokens
    global_rank: int = 0  # torchrun's RANK
    group: object = None  # the data-parallel process group (None: every rank)
    mesh: object = None  # --cp: the (data, ring, ulysses) DeviceMesh diffusers' context parallelism takes

    @property
    def main(self):  # the process that writes files and prints
        return self.global_rank == 0


def process_group_backend(cuda):
    """One process group for CPU AND CUDA tensors: gloo serves CPU tensors (logging, pair counts), nccl the
    CUDA ones (gradients). A plain "nccl" group serves CUDA tensors only and a GPU run would crash at its
    first CPU reduction; CPU runs (and the tests) get the same gloo half a GPU run gets."""
    return "cpu:gloo,cuda:nccl" if cuda else "cpu:gloo"


def setup_distributed(device_arg=None, cp=1):
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and join the process group; with cp > 1
    build the (data, ring, ulysses) = (WORLD_SIZE / cp, 1, cp) mesh: consecutive ranks form a context group
    (on one node, where the all-to-alls are fast)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available() and (device_arg is None or device_arg.startswith("cuda"))
    device = device_arg or ("cuda" if cuda else "cpu")
    if cuda:
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(process_group_backend(cuda))
    if cp == 1:
        return Dist(rank, world, device, global_rank=rank)
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cuda" if cuda else "cpu", (world // cp, 1, cp), mesh_dim_names=("data", "ring", "ulysses"))
    return Dist(rank // cp, world // cp, device, cp, rank, mesh["data"].get_group(), mesh)


def average_gradients(params, d):
    """All-reduce the gradients of `params` in place and divide by the world size. Called explicitly in
    every loop after backward: the popular video-alignment repos that skip this train each rank on its
    own shard and silently drift apart (the torchrun tests catch it). Tensor by tensor, so a full
    fine-tune never holds a second, flat copy of its gradients. Under FSDP2 (sharded parameters) the
    gradients were already reduce-scattered as a mean: nothing to do.
    --cp: the members of a context group hold the gradients of their own tokens, which SUM to the video's
    gradient: the all-reduce sums over every rank and divides by the data-parallel size only (under FSDP2,
    whose mean ran over every rank, the shards are multiplied by cp)."""
    if is_sharded(params):
        if d.cp > 1:
            for p in params:
                if p.grad is not None:
                    p.grad *= d.cp
        return
    if d.world * d.cp == 1:
        return
    for p in params:
        if p.grad is None:  # (a rank with no DPO pair this step still joins the average, with zeros)
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad /= d.world


def clip_grad_norm(params, max_norm):
    """torch's clip_grad_norm_, as a float (under FSDP the norm is a DTensor: its full value)."""
    return float(full(torch.nn.utils.clip_grad_norm_(params, max_norm)))


def broadcast_params(params, d):
    """Start every rank from rank 0's trainable weights (LoRA's random init included)."""
    if d.world * d.cp > 1:
        for p in params:
            dist.broadcast(p.data, src=0)


def all_mean(values, d):
    """Average a dict of floats across the data-parallel ranks (for logging)."""
    if d.world == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t, group=d.group)
    return {k: (t[i] / d.world).item() for i, k in enumerate(keys)}


def all_gather_tensor(x, d):
    """Concatenate a [n, ...] tensor from every data-parallel rank (rank order) along dim 0."""
    if d.world == 1:
        return x
    out = [torch.empty_like(x) for _ in range(d.world)]
    dist.all_gather(out, x.contiguous(), group=d.group)
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------
# FSDP2: sharding the denoiser, sharded checkpoints
# ----------------------------------------------------------------------------------------------
def blocks(den):
    """The repeated blocks of a denoiser, each its own FSDP unit (all-gathered just before it runs)."""
    for name in ("blocks", "transformer_blocks"):  # Wan (and the toy model); CogVideoX, LTX
        if hasattr(den, name):
            return list(getattr(den, name))
    return list(den.down_blocks) + [den.mid_block] + list(den.up_blocks)  # ModelScope's UNet3D


def shard(model, mixed_precision):
    """fully_shard each block, then each denoiser; returns the (now sharded) trainable parameters."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    if not dist.is_initialized():  # one process without torchrun: FSDP2 still needs a process group (of one)
        dist.init_process_group(process_group_backend(torch.cuda.is_available()), store=dist.HashStore(),
                                rank=0, world_size=1)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for den in model.experts:
        for block in blocks(den):
            fully_shard(block, mp_policy=policy)
        fully_shard(den, mp_policy=policy)
    return [p for den in model.experts for p in den.parameters() if p.requires_grad]


def reshard(modules):
    """Free the gathered weights of FSDP2 modules (a root keeps them after its forward): after an in-place
    swap of the sharded weights (the DPO reference), the next forward must gather them again."""
    for m in modules:
        if is_fsdp(m):
            m.reshard()


def is_fsdp(module):
    from torch.distributed.fsdp import FSDPModule
    return isinstance(module, FSDPModule)


def is_sharded(params):
    return isinstance(params[0], DTensor)


def full(t):
    """The whole tensor of a sharded one (a collective: every rank calls it), else the tensor itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def save(folder, model, params, optimizer, extra_tensors):
    """Each rank writes its shards of the trainable weights, AdamW's state and `extra_tensors` (name ->
    list of tensors shaped like `params`, e.g. the DPO reference) under folder/sharded."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    model_sd, optim_sd = get_state_dict(torch.nn.ModuleList(model.experts), optimizer,
                                        options=StateDictOptions(ignore_frozen_params=True, strict=False))
    state = {"model": model_sd, "optimizer": optim_sd}
    state |= {name: {str(i): t for i, t in enumerate(ts)} for name, ts in extra_tensors.items()}
    dcp.save(state, checkpoint_id=os.path.join(folder, "sharded"))


def load(folder, model, params, optimizer, extra_tensors):
    """Restore what `save` wrote, in place (the same number of ranks)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
    experts = torch.nn.ModuleList(model.experts)
    options = StateDictOptions(ignore_frozen_params=True, strict=False)  # (the frozen base is not in it)
    model_sd, optim_sd = get_state_dict(experts, optimizer, options=options)
    state = {"model": model_sd, "optimizer": optim_sd}
    state |= {name: {str(i): t for i, t in enumerate(ts)} for name, ts in extra_tensors.items()}
    dcp.load(state, checkpoint_id=os.path.join(folder, "sharded"))
    set_state_dict(experts, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=options)


def barrier():
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------------
# --offload-frozen: frozen models leave the GPU during the update
# ----------------------------------------------------------------------------------------------
def modules_of(obj):
    """The torch modules an object keeps in its attributes (a reward's networks, a weighted sum's terms')."""
    if isinstance(obj, torch.nn.Module):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [m for x in obj for m in modules_of(x)]
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return [m for v in vars(obj).values() if isinstance(v, (torch.nn.Module, list, tuple)) for m in modules_of(v)]
    return []


class Offload:
    """--offload-frozen: frozen models that the DPO update never calls (text encoder, VAE, reward model) leave
    the GPU while it runs. `away()` frees their weights' device memory (each storage resized to 0, the way
    FSDP2 frees gathered weights); `back()` reallocates them and copies them in from a host copy taken once:
    they are frozen, so it never goes stale, and each step costs one host-to-device copy. A call into an
    offloaded model fails loudly (its weights have no storage) instead of computing on garbage.
    Wan 14B at 480x832x81 under --fsdp on 8 x 80 GB: 76.9 -> 50.7 GiB per rank (benchmarks/memory_plan.py);
    the price is host memory: each rank keeps its own pinned copy (26 GiB with UMT5-XXL + VideoScore)."""

    def __init__(self, modules, enabled=True):
        by_storage = {}  # one entry per storage (tied weights share one), found before any is freed
        for t in (t for m in modules for t in list(m.parameters()) + list(m.buffers())) if enabled else ():
            if t.untyped_storage().nbytes():
                by_storage.setdefault(t.untyped_storage()._cdata, []).append(t)  # (the storage itself)
        self.storages = []
        for ts in by_storage.values():
            s = ts[0].untyped_storage()
            if not s.resizable():  # weights read straight from a memory-mapped file (CPU): into memory of our own
                s = torch.empty(s.nbytes(), dtype=torch.uint8, device=s.device).untyped_storage().copy_(s)
                with torch.no_grad():
                    for t in ts:
                        t.set_(s, t.storage_offset(), t.shape, t.stride())
            self.storages.append(s)
        self.host, self.is_away = None, False

    def away(self):
        if self.is_away:
            return
        if self.host is None:  # pinned when on a GPU: the copies back are then asynchronous
            pin = any(s.device.type == "cuda" for s in self.storages)
            self.host = [torch.empty(s.nbytes(), dtype=torch.uint8, pin_memory=pin).untyped_storage().copy_(s)
                         for s in self.storages]
        for s in self.storages:
            s.resize_(0)
        self.is_away = True

    def back(self):
        if not self.is_away:
            return
        for s, h in zip(self.storages, self.host):
            s.resize_(h.nbytes())
            s.copy_(h, non_blocking=True)
        self.is_away = False
