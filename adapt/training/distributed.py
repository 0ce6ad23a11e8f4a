"""Sharded training (FSDP2, DeepSpeed ZeRO) through Accelerate: the one place that knows how a sharded model's
weights and optimizer state are gathered and restored, so checkpoints and OUTPUT/final hold full tensors, never
one rank's shard. Every function here that gathers is a collective: all ranks call it, in the same order."""

import contextlib
import os

import torch

from ..errors import AdaptError


def enable_cpu_fsdp(accelerator):
    """Honour an FSDP launch (ACCELERATE_USE_FSDP=true, as `accelerate launch --config_file fsdp.yaml` sets) on
    CPU processes. Accelerate 1.x builds the FSDP plugin from the environment but only switches to FSDP on
    accelerator devices, so a gloo run would silently train as plain data parallel; this switches it to the same
    Accelerate FSDP2 code path a GPU run takes (`fully_shard` on each decoder layer and the root)."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return
    if state.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = getattr(state, "fsdp_plugin", None) or FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise AdaptError("FSDP on CPU needs FSDP2: set fsdp_version: 2 in the accelerate config")
    # both shared states: every later AcceleratorState() copies PartialState's distributed type over its own
    PartialState().distributed_type = DistributedType.FSDP
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin


def kind(accelerator) -> str | None:
    """"fsdp2", "deepspeed" or None (replicated weights: one process, DDP)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return "deepspeed"
    if accelerator.distributed_type == DistributedType.FSDP:
        if not accelerator.is_fsdp2:
            raise AdaptError("dlm-adapt supports FSDP2 only: set fsdp_version: 2 in the accelerate config")
        return "fsdp2"
    return None


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter (a DTensor's shard under FSDP2; the tensor itself otherwise)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def full_model_state(accelerator, model) -> dict:
    """Every weight of the prepared `model`, full-sized on CPU on the main process ({} elsewhere). FSDP2: torch's
    full state dict (Accelerate 1.15's `get_state_dict` asks it for `broadcast_from_rank0`, which hands back
    DTensor shards on CPU processes); ZeRO: Accelerate's gathering (the 16-bit consolidation for ZeRO-3)."""
    if kind(accelerator) == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return {}
    # copies: plain CPU tensors whose storage safetensors can inspect
    return {name: t.detach().to("cpu", copy=True).contiguous() for name, t in state.items()}


def trainable_state(accelerator, model) -> tuple[dict, dict]:
    """`training_state.trainable_state` of a sharded model: (full trainable tensors, aliases) on the main process.
    Tied parameters are one Parameter under several names; the first name holds the tensor."""
    state = full_model_state(accelerator, model)
    tensors, aliases, seen = {}, {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if not p.requires_grad:
            continue
        if id(p) in seen:
            aliases[name] = seen[id(p)]
            continue
        seen[id(p)] = name
        if accelerator.is_main_process:
            tensors[name] = state[name].contiguous()
    return tensors, aliases


@contextlib.contextmanager
def unsharded(model):
    """The FSDP2 root's own parameters gathered for calls that do not go through its forward."""
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def full_optimizer_state(model, optimizer) -> dict:
    """The FSDP2 optimizer state with full tensors keyed by parameter name, on the main process."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, _inner(optimizer), options=options)


def load_full_model_state(model, tensors: dict):
    """Load full tensors (a subset: LoRA saves only trainable ones) into the FSDP2 model's shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=False))


def load_optimizer_state(model, optimizer, state: dict, sharded: bool):
    """Restore `state`, the optimizer state a checkpoint holds: keyed by parameter name when a sharded run wrote it
    (full tensors; any number of processes can resume it), by position otherwise."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    by_name = any(isinstance(p, str) for group in state.get("param_groups", []) for p in group.get("params", []))
    if by_name:
        set_optimizer_state_dict(model, _inner(optimizer), state, options=StateDictOptions(full_state_dict=True))
    elif sharded:
        raise AdaptError("this checkpoint was written by a run without FSDP, whose optimizer state cannot be split "
                         "into shards; resume it without FSDP")
    else:
        optimizer.load_state_dict(state)


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer wraps the torch one


def check_full(state: dict, reference) -> None:
    """Refuse to publish weights whose shapes differ from a model built from the config: what writing one rank's
    shard, or a half-gathered state, would produce."""
    shapes = {name: tuple(t.shape) for name, t in reference.state_dict().items()}
    wrong = [(n, tuple(t.shape), shapes[n]) for n, t in state.items() if n in shapes and tuple(t.shape) != shapes[n]]
    missing = sorted(set(shapes) - set(state))
    if wrong:
        name, got, want = wrong[0]
        raise AdaptError(f"gathered weight {name} has shape {got}, the model's config says {want}: a shard, not the "
                         "full model; no final model was written")
    if missing:
        raise AdaptError(f"gathered weights lack {missing[0]}: no final model was written")
