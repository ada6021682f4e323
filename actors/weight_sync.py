"""Policy -> rollout weight transfer over a dedicated process group.

The group is built straight from a TCPStore (rank 0 = the policy's rank 0, ranks 1.. = the
rollout engines), beside each process's training group: gloo on CPU, NCCL on GPU. Weights
are gathered parameter by parameter (one at a time under ZeRO-3, so no rank ever holds the
whole model twice) and packed, in order, into flat byte buckets of at most BUCKET_BYTES; one
broadcast per bucket (a broadcast per tensor spent most of a small model's sync on latency:
~0.5 ms each on gloo). Both sides derive the same bucket layout from the weight specs. LoRA
policies send merged weights under the base model's names.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Iterator

import torch
from torch.distributed import TCPStore

TIMEOUT = datetime.timedelta(seconds=600)
WeightSpec = tuple[str, list[int], str]  # name, shape, dtype name

#: Largest bucket (a tensor bigger than this travels alone, in a bucket of its own size).
BUCKET_BYTES = 256 * 2**20
#: Each tensor starts at a multiple of this many bytes inside its bucket (dtype views need it).
ALIGN = 64


def spec_nbytes(spec: WeightSpec) -> int:
    _, shape, dtype = spec
    return math.prod(shape) * torch.empty((), dtype=getattr(torch, dtype)).element_size()


def plan_buckets(specs: list[WeightSpec], cap: int = BUCKET_BYTES) -> list[list[tuple[int, int]]]:
    """Consecutive specs packed into buckets: per bucket, (spec index, byte offset) pairs.

    A bucket closes before a tensor that would take it past `cap`; offsets are ALIGN-aligned.
    Sender and receivers call this on the same specs, so they agree on every byte.
    """
    buckets: list[list[tuple[int, int]]] = []
    current: list[tuple[int, int]] = []
    size = 0
    for i, spec in enumerate(specs):
        n = spec_nbytes(spec)
        if current and size + n > cap:
            buckets.append(current)
            current, size = [], 0
        current.append((i, size))
        size += -(-n // ALIGN) * ALIGN
    if current:
        buckets.append(current)
    return buckets


def bucket_nbytes(specs: list[WeightSpec], bucket: list[tuple[int, int]]) -> int:
    last, offset = bucket[-1]
    return offset + spec_nbytes(specs[last])


class BucketSender:
    """Packs the tensors given to `add`, in spec order, and broadcasts each bucket once full.

    One staging buffer (the largest bucket) is reused: each broadcast completes before the
    next bucket is packed into it.
    """

    def __init__(self, group, specs: list[WeightSpec], device: str, cap: int = BUCKET_BYTES):
        self.group, self.specs = group, specs
        self.buckets = plan_buckets(specs, cap)
        largest = max((bucket_nbytes(specs, b) for b in self.buckets), default=0)
        self.buffer = torch.empty(largest, dtype=torch.uint8, device=device)
        self.begin()

    def begin(self) -> None:
        """Start a new transfer (from the first bucket)."""
        self.bucket, self.slot, self.sent = 0, 0, 0

    def add(self, tensor: torch.Tensor) -> None:
        index, offset = self.buckets[self.bucket][self.slot]
        name, shape, dtype = self.specs[index]
        if list(tensor.shape) != list(shape) or str(tensor.dtype) != f"torch.{dtype}":
            raise ValueError(
                f"weight {name!r}: sending {tuple(tensor.shape)} {tensor.dtype}, "
                f"the receivers expect {tuple(shape)} {dtype}"
            )
        flat = tensor.detach().contiguous().view(-1).view(torch.uint8)
        self.buffer[offset : offset + flat.numel()].copy_(flat)
        self.slot += 1
        self.sent += 1
        if self.slot == len(self.buckets[self.bucket]):
            size = bucket_nbytes(self.specs, self.buckets[self.bucket])
            self.group.broadcast(self.buffer[:size], 0).wait()
            self.bucket, self.slot = self.bucket + 1, 0

    def finish(self) -> int:
        """Tensors sent; refuses a transfer that stopped short of the specs."""
        if self.sent != len(self.specs):
            raise RuntimeError(f"weight sync sent {self.sent} of {len(self.specs)} tensors")
        return self.sent


def open_group(addr: str, port: int, world_size: int, rank: int, device: str):
    store = TCPStore(addr, port, world_size, rank == 0, timeout=TIMEOUT)
    if device.startswith("cuda"):
        from torch.distributed.distributed_c10d import ProcessGroupNCCL

        return ProcessGroupNCCL(store, rank, world_size)
    from torch.distributed.distributed_c10d import ProcessGroupGloo

    return ProcessGroupGloo(store, rank, world_size, TIMEOUT)


def merged_named_weights(module) -> Iterator[tuple[str, torch.nn.Parameter | torch.Tensor, object]]:
    """(hf_name, tensor-or-param, lora_layer_or_None) of the model as plain HF weights.

    For a peft model, adapted linears are reported under their base names with the LoRA
    layer, so the sender can add the adapter's delta (W + B A * scale) after gathering.
    """
    if not hasattr(module, "peft_config"):
        for name, p in module.named_parameters():
            yield name, p, None
        return
    from peft.tuners.lora import LoraLayer

    inner = module.get_base_model()
    lora_layers = {name: m for name, m in inner.named_modules() if isinstance(m, LoraLayer)}
    for name, p in inner.named_parameters():
        if "lora_" in name:
            continue
        owner = name.rsplit(".", 2)[0] if ".base_layer." in name else None
        if owner in lora_layers and name.endswith(".base_layer.weight"):
            yield name.replace(".base_layer", ""), p, lora_layers[owner]
        else:
            yield name.replace(".base_layer", ""), p, None


def lora_delta(layer) -> torch.Tensor:
    return sum(layer.get_delta_weight(a) for a in layer.active_adapters)


class WeightReceiver:
    def __init__(self, addr: str, port: int, world_size: int, rank: int, device: str):
        self.group = open_group(addr, port, world_size, rank, device)
        self.device = device

    def receive(
        self, specs: list[WeightSpec], cap: int = BUCKET_BYTES
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) in spec order; each tensor is a view into its bucket's own buffer
        (a fresh one per bucket, so consumers may keep what they are given)."""
        for bucket in plan_buckets(specs, cap):
            buf = torch.empty(bucket_nbytes(specs, bucket), dtype=torch.uint8, device=self.device)
            self.group.broadcast(buf, 0).wait()
            for index, offset in bucket:
                name, shape, dtype = specs[index]
                n = spec_nbytes(specs[index])
                yield name, buf[offset : offset + n].view(getattr(torch, dtype)).view(shape)

    @torch.no_grad()
    def receive_into(self, params: dict[str, torch.nn.Parameter], specs: list[WeightSpec]) -> int:
        missing = [name for name, _, _ in specs if name not in params]
        if missing:
            raise KeyError(f"rollout model has no parameter {missing[0]!r} (architectures differ?)")
        count = 0
        for name, tensor in self.receive(specs):
            params[name].data.copy_(tensor)
            count += 1
        return count
