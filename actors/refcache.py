"""Precomputed reference log-probs (DPO family): computed once for the whole training set,
in chunks in the order of the first epoch so that the first steps never wait for the rest,
and cached on disk (safetensors) under the data cache, keyed by the tokenised data and the
reference model. Later epochs and later runs read the cache."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rlhf.assets import cache_dir, resolve_model_path
from rlhf.config import RunConfig
from rlhf.objectives import RefLogps
from rlhf.precision import cpu_bf16

CHUNK_EXAMPLES = 64


def cache_key(cfg: RunConfig, dataset) -> str:
    """Hash of the tokenised examples and of the reference weights' identity and precision
    (train.precision decides the reference's dtype: a bf16 reference's log-probs are not an
    fp32 one's, and `auto` resolves by the CPU's bf16 support)."""
    model_cfg = cfg.roles.reference.model or cfg.model
    h = hashlib.sha256()
    path = resolve_model_path(model_cfg.name_or_path)
    precision = [cfg.train.precision, cpu_bf16()[0]]
    h.update(json.dumps([path, model_cfg.revision, model_cfg.dtype, *precision]).encode())
    if Path(path).is_dir():
        for f in sorted(Path(path).glob("*.safetensors")):
            stat = f.stat()
            h.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    for f in dataset.features:
        h.update(json.dumps([f.prompt_ids, f.chosen_ids, f.rejected_ids]).encode())
    return h.hexdigest()[:24]


class ReferenceCache:
    def __init__(self, cfg: RunConfig, dataset, reference, collate, order: list[int]):
        self.path = cache_dir() / "ref_logps" / f"{cache_key(cfg, dataset)}.safetensors"
        self.table = torch.full((len(dataset), 2), float("nan"))
        self.pending: dict[int, tuple[list, int, list[list[int]]]] = {}
        self.chunk_of: dict[int, int] = {}
        self.reference = reference
        if self.path.exists():
            self.table = load_file(self.path)["logps"]
            return
        micro = cfg.train.micro_batch_size
        for c, start in enumerate(range(0, len(order), CHUNK_EXAMPLES)):
            chunk = order[start : start + CHUNK_EXAMPLES]
            groups = [chunk[i : i + micro] for i in range(0, len(chunk), micro)]
            batches = [collate([dataset[i] for i in g]) for g in groups]
            self.pending[c] = (reference.logps(batches), len(batches), groups)
            for i in chunk:
                self.chunk_of[i] = c

    @property
    def complete(self) -> bool:
        return not self.pending

    def _collect(self, chunk: int) -> None:
        refs, n, groups = self.pending.pop(chunk)
        for group, ref in zip(groups, self.reference.collect(refs, n), strict=True):
            k = len(group)
            self.table[group, 0] = ref.logps[:k]
            self.table[group, 1] = ref.logps[k:]
        if not self.pending:
            self._save()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        save_file({"logps": self.table.contiguous()}, str(tmp))
        tmp.replace(self.path)

    def wait_all(self) -> None:
        for chunk in sorted(self.pending):
            self._collect(chunk)

    def lookup(self, batch) -> RefLogps:
        """Reference sums for a preference batch: chosen rows then rejected rows."""
        index = batch.index.tolist()
        for chunk in sorted(
            {self.chunk_of[i] for i in index if self.chunk_of.get(i) in self.pending}
        ):
            self._collect(chunk)
        return RefLogps(torch.cat([self.table[index, 0], self.table[index, 1]]))
