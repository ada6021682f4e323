"""What every role's Ray actor shares: rank and world environment, the process group, thread
pinning and a health probe."""

from __future__ import annotations

import contextlib
import io
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from actors.net import LOOPBACK, loopback_interface, tcp_store


@dataclass(frozen=True)
class RankInfo:
    """Where one actor sits in its role's group."""

    rank: int
    world_size: int
    master_addr: str
    master_port: int
    local_rank: int = 0


def _say_if_compiling_shm_op() -> None:
    """DeepSpeed's CPU accelerator compiles a shared-memory op the first time, silently."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    if not any(Path(root).glob("**/deepspeed_shm_comm*.so")):
        print(
            "compiling DeepSpeed's shared-memory op for CPU runs (first run on this machine only: "
            f"30-70 s, needs a C++ compiler; kept in {root}, set by TORCH_EXTENSIONS_DIR)",
            flush=True,
        )


def pin_threads(n: int | None = None) -> int:
    """One torch thread per process unless told otherwise: on small machines two threads per
    process run 5-50x slower as soon as another process competes for the cores."""
    import torch

    n = n or int(os.environ.get("RLHF_THREADS_PER_ACTOR", "1"))
    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)
    return n


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


class Worker:
    """Base of the role actors. Sets the torch.distributed environment for its rank; the
    process group itself is created by `init_process_group` (DeepSpeed's, for trainers)."""

    def __init__(self, info: RankInfo):
        self.info = info
        os.environ.update(
            {
                "RANK": str(info.rank),
                "WORLD_SIZE": str(info.world_size),
                "LOCAL_RANK": str(info.local_rank),
                "MASTER_ADDR": info.master_addr,
                "MASTER_PORT": str(info.master_port),
            }
        )
        if info.master_addr in LOOPBACK and loopback_interface():
            # A local run: gloo's pairs and NCCL's bootstrap listen on the loopback too, not on
            # the host's address (one node: NCCL moves the data over NVLink/PCIe/shm anyway).
            os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback_interface())
            os.environ.setdefault("NCCL_SOCKET_IFNAME", loopback_interface())
        pin_threads()
        if has_gpu():
            import torch

            torch.cuda.set_device(info.local_rank)
        else:
            # Said by the placement plan already; DeepSpeed would warn again in every actor.
            os.environ.setdefault("DS_ACCELERATOR", "cpu")

    @property
    def device(self) -> str:
        return f"cuda:{self.info.local_rank}" if has_gpu() else "cpu"

    def init_process_group(self) -> None:
        """gloo on CPU, NCCL on GPU, rendezvous through `tcp_store` (listening on the master
        address only); DeepSpeed then adopts the group."""
        import datetime

        import deepspeed
        import torch.distributed as dist

        backend = "nccl" if has_gpu() else "gloo"
        if backend == "gloo" and self.info.rank == 0:
            _say_if_compiling_shm_op()
        if not dist.is_initialized():
            i = self.info
            timeout = datetime.timedelta(minutes=30)
            store = tcp_store(i.master_addr, i.master_port, i.world_size, i.rank, timeout)
            dist.init_process_group(
                backend, store=store, rank=i.rank, world_size=i.world_size, timeout=timeout
            )
        # DeepSpeed prints "... shm_comm_op built successfully" in every rank at every run,
        # also when it only loads the compiled op (a first compile is said above).
        with contextlib.redirect_stdout(io.StringIO()):
            deepspeed.init_distributed(dist_backend=backend, verbose=False)

    def peak_rss_mb(self) -> float:
        """Peak resident memory of this actor's process, in MiB."""
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def forward_rollout(self, spec: tuple[int, int, int, int], *parts) -> list:
        """`per_token` on this rank's share of a rollout, given as the engines' outputs:
        passed as refs, they come straight from the object store, and the call starts as soon
        as the rollout is done, with no driver round trip. spec = (pad id, rank, world size,
        micro-batch size)."""
        from rlhf.rollout import experience_inputs

        micro_batches, start = experience_inputs(parts, *spec)
        return self.per_token(micro_batches, start)

    def per_token(self, sequences: list, start: int = 0) -> list:
        """make_experience's per-token forward of this role over (input_ids, attention_mask)
        micro-batches, from column `start` on (log-probs, or values)."""
        raise NotImplementedError(f"{type(self).__name__} has no per-token forward")

    def perf_module(self):
        """The model whose shape the FLOPs model counts (None: this role does no model math
        the model counts, e.g. a reward function), and the dtype it computes in."""
        return None, None

    def perf_info(self) -> dict:
        """What the driver's utilisation metrics need from this rank, asked once at start:
        the role model's shape (rlhf.flops.ModelShape) and this device's peak FLOP/s at the
        dtype it computes in (None where unknown), with where that peak came from."""
        from rlhf.flops import ModelShape, device_peak

        module, dtype = self.perf_module()
        if module is None:
            return {"shape": None, "peak": None, "source": "no model"}
        shape = module if isinstance(module, ModelShape) else ModelShape.of(module)
        peak, source = device_peak(self.device, dtype)
        return {"shape": shape, "peak": peak, "source": f"{source}, {str(dtype)[6:]}"}

    def ping(self) -> dict:
        """Health probe: who and where this actor is."""
        return {"rank": self.info.rank, "pid": os.getpid(), "host": socket.gethostname()}
