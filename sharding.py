"""FSDP2 (`--fsdp`): PyTorch's own sharding engine for the denoiser, and sharded checkpoints.

`shard` applies `torch.distributed.fsdp.fully_shard` to every transformer block, then to the root, of
each denoiser (both experts of Wan 2.2 A14B), with FSDP2's mixed-precision policy: compute in the
autocast dtype, gradients reduced in fp32. The trainable weights (LoRA, or all for a full fine-tune),
their gradients, AdamW's state and the DPO reference's copy are all sharded: no rank holds a full
copy of any of them. FSDP2 reduce-scatters the MEAN gradient over ranks, so the explicit
`common.average_gradients` is skipped for sharded parameters. Text encoder, VAE and reward stay
replicated (frozen, bf16 under --mixed-precision bf16; see README for when to shard them too).

Every rank must run the same number of denoiser forwards and backwards (each is a collective):
the scripts pad evaluations to equal counts and, under FSDP, a DPO rank whose pairs were all
filtered still runs them with weight 0. Checkpoints: `torch.distributed.checkpoint` (each rank
writes its shards of trainable weights, optimizer state and the reference), the LoRA gathered and
written by rank 0 in the diffusers format the stock pipeline loads.
"""
import os

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


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
        import common
        dist.init_process_group(common.process_group_backend(torch.cuda.is_available()), store=dist.HashStore(),
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
