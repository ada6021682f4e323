"""Policy -> rollout weight transfer over dedicated process groups.

The groups are built straight from TCPStores (rank 0 = the policy's rank 0, ranks 1.. = the
rollout engines), beside each process's training group. The transport of each engine is
chosen from the placement plan at setup (PlacementPlan.sync_transports): a broadcast on
gloo on CPU, NCCL across GPUs; and CUDA IPC for an engine on the sender's own GPU, since
NCCL refuses a communicator with two ranks on one GPU: the sender hands each tensor over as
an IPC handle on a small gloo group, the engine copies from the mapped memory, and both meet
at a barrier before the sender reuses or frees it. Weights are gathered parameter by
parameter (one at a time under ZeRO-3, so no rank ever holds the whole model twice).
Tensors of DIRECT_BYTES or more travel as they are (straight into the HF engine's parameter
on arrival); smaller ones are packed, in order, into flat byte buckets of at most
BUCKET_BYTES, one transfer per bucket: a broadcast per small tensor spent most of a small
model's sync on latency (~0.5 ms each on gloo), and staging the large ones would only add a
copy. Both sides derive the same layout from the weight specs. LoRA policies send merged
weights under the base model's names.
"""

from __future__ import annotations

import datetime
import io
import math
import pickle
from collections.abc import Iterator

import torch

from actors.net import tcp_store

TIMEOUT = datetime.timedelta(seconds=600)
WeightSpec = tuple[str, list[int], str]  # name, shape, dtype name

#: Largest bucket of packed small tensors.
BUCKET_BYTES = 64 * 2**20
#: Tensors at least this large travel alone, unstaged.
DIRECT_BYTES = 2**20
#: Each tensor starts at a multiple of this many bytes inside its bucket (dtype views need it).
ALIGN = 64


def spec_nbytes(spec: WeightSpec) -> int:
    _, shape, dtype = spec
    return math.prod(shape) * torch.empty((), dtype=getattr(torch, dtype)).element_size()


def plan_buckets(
    specs: list[WeightSpec], cap: int = BUCKET_BYTES, direct: int = DIRECT_BYTES
) -> list[list[tuple[int, int]]]:
    """Consecutive specs grouped for transfer: per bucket, (spec index, byte offset) pairs.

    A tensor of `direct` bytes or more is a bucket of its own, sent unstaged (is_direct);
    the others are packed, a bucket closing before a tensor that would take it past `cap`,
    offsets ALIGN-aligned. Sender and receivers call this on the same specs, so they agree
    on every byte.
    """
    buckets: list[list[tuple[int, int]]] = []
    current: list[tuple[int, int]] = []
    size = 0
    for i, spec in enumerate(specs):
        n = spec_nbytes(spec)
        if current and (n >= direct or size + n > cap):
            buckets.append(current)
            current, size = [], 0
        if n >= direct:
            buckets.append([(i, 0)])
            continue
        current.append((i, size))
        size += -(-n // ALIGN) * ALIGN
    if current:
        buckets.append(current)
    return buckets


def is_direct(specs: list[WeightSpec], bucket: list[tuple[int, int]], direct: int) -> bool:
    return len(bucket) == 1 and spec_nbytes(specs[bucket[0][0]]) >= direct


def bucket_nbytes(specs: list[WeightSpec], bucket: list[tuple[int, int]]) -> int:
    last, offset = bucket[-1]
    return offset + spec_nbytes(specs[last])


#: The transports of PlacementPlan.sync_transports, and "auto": NCCL on a GPU, else gloo (a
#: sync whose groups were started without a placement plan).
TRANSPORTS = ("gloo", "nccl", "cuda_ipc", "auto")


class Broadcast:
    """A tensor from rank 0 to every other rank of a gloo or NCCL group, in place."""

    def __init__(self, group):
        self.group = group

    def send(self, tensor: torch.Tensor) -> None:
        self.group.broadcast(tensor, 0).wait()

    def recv_into(self, tensor: torch.Tensor) -> None:
        self.group.broadcast(tensor, 0).wait()


class CudaIpc:
    """A tensor from rank 0 to the other ranks of a gloo group whose members share rank 0's
    GPU: rank 0 broadcasts the tensor's CUDA IPC handle (torch's own reduction of a CUDA
    tensor, pickled), each receiver maps the memory, copies it into its tensor, and all meet
    at a barrier (an all-reduce) before `send` returns, so the sender may then reuse or free
    the memory. The handles are read back by an unpickler that admits torch's classes only."""

    def __init__(self, group):
        self.group = group

    def _barrier(self) -> None:
        self.group.allreduce([torch.zeros(1)]).wait()

    def send(self, tensor: torch.Tensor) -> None:
        from torch.multiprocessing.reductions import reduce_tensor

        torch.cuda.current_stream(tensor.device).synchronize()  # the data is written
        _, args = reduce_tensor(tensor.detach())
        payload = torch.frombuffer(bytearray(pickle.dumps(args)), dtype=torch.uint8)
        self.group.broadcast(torch.tensor([payload.numel()]), 0).wait()
        self.group.broadcast(payload, 0).wait()
        self._barrier()

    def recv_into(self, tensor: torch.Tensor) -> None:
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        size = torch.zeros(1, dtype=torch.int64)
        self.group.broadcast(size, 0).wait()
        payload = torch.empty(int(size.item()), dtype=torch.uint8)
        self.group.broadcast(payload, 0).wait()
        args = list(_TorchUnpickler(io.BytesIO(payload.numpy().tobytes())).load())
        args[6] = torch.cuda.current_device()  # the shared GPU, as this process numbers it
        shared = rebuild_cuda_tensor(*args)
        tensor.copy_(shared)
        torch.cuda.current_stream().synchronize()
        del shared
        self._barrier()


class _TorchUnpickler(pickle.Unpickler):
    """Loads a CUDA IPC reduction (classes and dtypes of torch, plain values), nothing else."""

    def find_class(self, module: str, name: str):
        if module == "torch" or module.startswith("torch."):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"weight sync: refusing {module}.{name} in an IPC handle")


class BucketSender:
    """Packs the tensors given to `add`, in spec order, and hands each bucket once full to
    every channel (Broadcast, CudaIpc).

    One staging buffer (the largest bucket) is reused: each transfer completes before the
    next bucket is packed into it.
    """

    def __init__(
        self,
        channels: list,
        specs: list[WeightSpec],
        device: str,
        cap: int = BUCKET_BYTES,
        direct: int = DIRECT_BYTES,
    ):
        self.channels, self.specs = channels, specs
        self.buckets = plan_buckets(specs, cap, direct)
        self.direct = [is_direct(specs, b, direct) for b in self.buckets]
        staged = [
            bucket_nbytes(specs, b) for b, d in zip(self.buckets, self.direct, strict=True) if not d
        ]
        self.buffer = torch.empty(max(staged, default=0), dtype=torch.uint8, device=device)
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
        self.slot += 1
        self.sent += 1
        if self.direct[self.bucket]:
            self._send(tensor.detach().contiguous())
            self.bucket, self.slot = self.bucket + 1, 0
            return
        flat = tensor.detach().contiguous().view(-1).view(torch.uint8)
        self.buffer[offset : offset + flat.numel()].copy_(flat)
        if self.slot == len(self.buckets[self.bucket]):
            size = bucket_nbytes(self.specs, self.buckets[self.bucket])
            self._send(self.buffer[:size])
            self.bucket, self.slot = self.bucket + 1, 0

    def _send(self, tensor: torch.Tensor) -> None:
        for channel in self.channels:
            channel.send(tensor)

    def finish(self) -> int:
        """Tensors sent; refuses a transfer that stopped short of the specs."""
        if self.sent != len(self.specs):
            raise RuntimeError(f"weight sync sent {self.sent} of {len(self.specs)} tensors")
        return self.sent


def open_group(addr: str, port: int, world_size: int, rank: int, backend: str):
    """A process group of its own ("gloo" or "nccl"), outside torch.distributed's default."""
    store = tcp_store(addr, port, world_size, rank, TIMEOUT)
    if backend == "nccl":
        from torch.distributed.distributed_c10d import ProcessGroupNCCL

        return ProcessGroupNCCL(store, rank, world_size)
    from torch.distributed.distributed_c10d import ProcessGroupGloo

    return ProcessGroupGloo(store, rank, world_size, TIMEOUT)


def open_channel(addr: str, port: int, world_size: int, rank: int, transport: str, device: str):
    """The channel of one transport (TRANSPORTS) between the sender (rank 0) and its engines."""
    if transport not in TRANSPORTS:
        raise ValueError(f"weight sync: unknown transport {transport!r} (one of {TRANSPORTS})")
    if transport == "cuda_ipc":
        return CudaIpc(open_group(addr, port, world_size, rank, "gloo"))
    if transport == "auto":
        transport = "nccl" if device.startswith("cuda") else "gloo"
    return Broadcast(open_group(addr, port, world_size, rank, transport))


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
    def __init__(
        self, addr: str, port: int, world_size: int, rank: int, device: str, transport="auto"
    ):
        self.channel = open_channel(addr, port, world_size, rank, transport, device)
        self.device = device

    def receive(
        self,
        specs: list[WeightSpec],
        cap: int = BUCKET_BYTES,
        direct: int = DIRECT_BYTES,
        into: dict[str, torch.Tensor] | None = None,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) in spec order. A packed tensor is a view into its bucket's own
        buffer (a fresh one per bucket, so consumers may keep what they are given); a direct
        one arrives in a fresh tensor, or in place in `into[name]` when that matches it."""
        for bucket in plan_buckets(specs, cap, direct):
            if is_direct(specs, bucket, direct):
                name, shape, dtype = specs[bucket[0][0]]
                target = (into or {}).get(name)
                if not _fits(target, shape, dtype):
                    target = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
                self.channel.recv_into(target)
                yield name, target
                continue
            buf = torch.empty(bucket_nbytes(specs, bucket), dtype=torch.uint8, device=self.device)
            self.channel.recv_into(buf)
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
        data = {name: p.data for name, p in params.items()}
        for name, tensor in self.receive(specs, into=data):
            if tensor.data_ptr() != data[name].data_ptr():  # direct ones arrived in place
                data[name].copy_(tensor)
            count += 1
        return count


def _fits(target: torch.Tensor | None, shape: list[int], dtype: str) -> bool:
    return (
        target is not None
        and target.is_contiguous()
        and list(target.shape) == list(shape)
        and target.dtype == getattr(torch, dtype)
    )
