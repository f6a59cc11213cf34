"""`distributed=ddp|zero2|zero3|fsdp`: one accelerate code path for every mode, on GPUs and (for CI) on CPU.

    torchrun --nproc_per_node 8 -m specdistill.train.train distributed=zero2 data_dir=...      # one node, 8 GPUs
    accelerate launch --num_processes 8 -m specdistill.train.train distributed=zero3 ...        # the same, through accelerate
    torchrun --nnodes 2 --node_rank $RANK --nproc_per_node 8 --rdzv_backend c10d \
        --rdzv_endpoint $HEAD:29500 -m specdistill.train.train distributed=fsdp ...             # two nodes

What each mode shards (the frozen target is never prepared, never optimized, never checkpointed: every process holds
a full copy, so a target that does not fit one device is trained against through the offline feature cache, which
runs it once, instead):

    ddp    nothing: the drafter and its optimizer replicated, gradients all-reduced (accelerate's DDP)
    zero2  DeepSpeed ZeRO-2: optimizer states and gradients sharded, the drafter's weights replicated
    zero3  DeepSpeed ZeRO-3: the drafter's weights too; each process checkpoints its own shard
    fsdp   torch FSDP2 (fully_shard) through accelerate: weights, gradients and optimizer states sharded; sharded
           (distributed-checkpoint) saves

The DeepSpeed JSON comes from conf/distributed/zero*.yaml (`distributed.deepspeed`), with the keys train owns filled
from train.* and optim.* (micro-batch size, accumulation, clipping, precision), so one setting never has two values.

CPU (CI, 2 processes with gloo) takes the GPU path with two differences, both here and nowhere else:
  * accelerate picks no process-group backend on a CPU-only machine unless told, and every process then believes it
    is alone (num_processes 1): we pass gloo. On a GPU it picks NCCL itself, and we pass nothing.
  * accelerate offers FSDP only for GPU-like devices: on CPU we mark the state as multi-GPU before it is built, so the
    rest (fully_shard, no_sync, clipping, save/load_state, get_state_dict) is accelerate's own FSDP2 code.
`check_mode` refuses a run whose Accelerator did not come up as asked (accelerate silently falls back to DDP or to one
process in some combinations).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from specdistill.distill.errors import UserError

log = logging.getLogger("specdistill.train")


class DistributedMode(Enum):
    ddp = "ddp"
    zero2 = "zero2"
    zero3 = "zero3"
    fsdp = "fsdp"


@dataclass
class FsdpConfig:
    reshard_after_forward: bool = True  # free the gathered weights after each forward (ZeRO-3-like); false: ZeRO-2-like
    cpu_offload: bool = False  # keep the sharded weights and optimizer states in CPU memory


@dataclass
class DistributedConfig:
    mode: DistributedMode = DistributedMode.ddp
    # DeepSpeed config JSON (zero2 / zero3), e.g. its zero_optimization block; https://www.deepspeed.ai/docs/config-json/
    deepspeed: Any = field(default_factory=dict)
    fsdp: FsdpConfig = field(default_factory=FsdpConfig)


# DeepSpeed keys that train sets from its own settings: the key a user sets instead
TRAIN_OWNED_DEEPSPEED_KEYS = {
    "train_micro_batch_size_per_gpu": "train.batch_size",
    "train_batch_size": "train.batch_size (× processes × train.grad_accum)",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "optim.grad_clip_norm",
    "bf16": "train.mixed_precision",
    "fp16": "train.mixed_precision",
    "optimizer": "optim.*",
    "scheduler": "optim.*",
}


def deepspeed_config(cfg: Any, precision: str) -> dict:
    """distributed.deepspeed plus what train owns. DeepSpeed clips inside its own step, so the clip norm goes here."""
    from omegaconf import OmegaConf

    user = OmegaConf.to_container(cfg.distributed.deepspeed, resolve=True) if cfg.distributed.deepspeed else {}
    clashing = sorted(set(user) & set(TRAIN_OWNED_DEEPSPEED_KEYS))
    if clashing:
        raise UserError(f"distributed.deepspeed.{clashing[0]} is set by train itself; set "
                        f"{TRAIN_OWNED_DEEPSPEED_KEYS[clashing[0]]} instead")
    stage = {"zero2": 2, "zero3": 3}[cfg.distributed.mode.value]
    zero = dict(user.get("zero_optimization") or {})
    if zero.setdefault("stage", stage) != stage:
        raise UserError(f"distributed.deepspeed.zero_optimization.stage={zero['stage']} contradicts "
                        f"distributed={cfg.distributed.mode.value}; choose the mode with distributed=zero{zero['stage']}")
    return {**user, "zero_optimization": zero,
            "train_micro_batch_size_per_gpu": cfg.train.batch_size,
            "gradient_accumulation_steps": cfg.train.grad_accum,
            "gradient_clipping": cfg.optim.grad_clip_norm,
            "bf16": {"enabled": precision == "bf16"}, "fp16": {"enabled": precision == "fp16"}}


def resolve_precision(setting: str, cuda: bool, native_bf16: bool | None = None) -> str:
    """train.mixed_precision → accelerate's: auto is bf16 on a GPU, fp32 ("no") on a CPU. bf16 on a CPU without
    native bf16 matmuls (oneDNN needs AVX-512 BF16 or AMX; `native_bf16` None: ask it) is kept, with a warning:
    PyTorch then runs a reference GEMM (EAGLE-3 on SmolLM2 from the cache: 54 s a step against about 2 s in fp32 on
    a 2-core AVX2 EPYC)."""
    if setting == "auto":
        return "bf16" if cuda else "no"
    if native_bf16 is None:
        native_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if setting == "bf16" and not cuda and not native_bf16:
        log.warning("WARNING: train.mixed_precision=bf16 on a CPU without native bf16 matmuls (AVX-512 BF16 or AMX): "
                    "PyTorch falls back to a reference GEMM, about 25x slower than fp32. Set "
                    "train.mixed_precision=no (or auto) on this machine.")
    return setting


def make_accelerator(cfg: Any, precision: str, log_with: str | None) -> Any:
    """The Accelerator for distributed.mode (see the module docstring for what differs on CPU)."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin, InitProcessGroupKwargs

    from accelerate.state import AcceleratorState, GradientState

    mode, cuda = cfg.distributed.mode.value, torch.cuda.is_available()
    # accelerate keeps one state per process: a --multirun's next job starts from a clean one (its plugins may differ)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    for flag in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):  # set by an earlier job's plugin
        os.environ.pop(flag, None)
    common = {"mixed_precision": precision, "log_with": log_with, "gradient_accumulation_steps": cfg.train.grad_accum}
    if mode == "ddp":
        # cpu=True on a CPU-only machine: without it, processes never join one group
        return check_mode(Accelerator(cpu=not cuda, **common), mode)
    handlers = [] if cuda else [InitProcessGroupKwargs(backend="gloo")]
    if "WORLD_SIZE" not in os.environ:
        _single_process_group()
    if mode in ("zero2", "zero3"):
        _require_deepspeed()
        plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg, precision), zero3_init_flag=False)
        accelerator = Accelerator(deepspeed_plugin=plugin, kwargs_handlers=handlers, **common)
        if mode == "zero3":
            # Otherwise transformers builds every model loaded from now on (the frozen target, a token-level drafter)
            # partitioned and empty; only the drafter, through `prepare`, is to be sharded.
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
        return check_mode(accelerator, mode)
    if not cuda:
        _fsdp_on_cpu()
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, reshard_after_forward=cfg.distributed.fsdp.reshard_after_forward,
        cpu_offload=cfg.distributed.fsdp.cpu_offload, state_dict_type="SHARDED_STATE_DICT",
        cpu_ram_efficient_loading=False)
    return check_mode(Accelerator(fsdp_plugin=plugin, kwargs_handlers=handlers, **common), mode)


_OWN_GROUP = "SPECDISTILL_OWN_PROCESS_GROUP"  # set when this process made its group of one (no launcher)


def end_run(accelerator: Any) -> None:
    """accelerate's end_training, except that a group of one this process made itself stays up: a --multirun's next
    job joins it (DeepSpeed keeps references to the group it first saw, and fails on a new one)."""
    for tracker in accelerator.trackers:
        tracker.finish()
    if os.environ.get(_OWN_GROUP) != "1":
        accelerator.state.destroy_process_group()


def _single_process_group() -> None:
    """Started without a launcher: a process group of one, as `torchrun --nproc_per_node 1` would set up (DeepSpeed
    and FSDP need a group even alone)."""
    import socket

    with socket.socket() as probe:  # a free port, so two such runs on one machine never collide
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), _OWN_GROUP: "1"})


def _require_deepspeed() -> None:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise UserError("distributed=zero2/zero3 needs DeepSpeed: pip install 'specdistill[deepspeed]'") from None


def _fsdp_on_cpu() -> None:
    """accelerate builds FSDP only for GPU-like devices; on CPU (tests) mark the state multi-GPU first, with gloo."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    PartialState(cpu=False, backend="gloo")
    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


def check_mode(accelerator: Any, mode: str) -> Any:
    """Refuse an Accelerator that is not what distributed=<mode> asked for: accelerate falls back silently (to DDP,
    or to every process training alone) in some combinations of devices and flags."""
    from accelerate.utils import DistributedType

    expected = {"zero2": DistributedType.DEEPSPEED, "zero3": DistributedType.DEEPSPEED, "fsdp": DistributedType.FSDP}
    world = int(os.environ.get("WORLD_SIZE", "1"))
    wrong_type = mode in expected and accelerator.distributed_type != expected[mode]
    if wrong_type or accelerator.num_processes != world:
        raise UserError(
            f"distributed={mode}: accelerate started {accelerator.distributed_type.value} with "
            f"{accelerator.num_processes} process(es) for a launch of {world}; check the launcher's flags "
            "(accelerate launch: do not pass --cpu with DeepSpeed or FSDP) and that every process sees the same config")
    return accelerator

