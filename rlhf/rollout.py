"""Rollouts as data: the engines' output for a prompt batch, and the pure helpers that merge
them, lay them out as sequences and cut them into each rank's micro-batches. Used by the
engines (actors.rollout, actors.rollout_vllm), by every role's per-token forward and by the
online loop; nothing here talks to an actor."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from rlhf.data.collate import pad

#: A checkpoint's batches in flight (async online runs): INFLIGHT.safetensors + INFLIGHT.json.
INFLIGHT = "inflight"


@dataclass(frozen=True)
class Rollout:
    """Responses for a prompt batch, n samples per prompt adjacent (prompt i -> rows i*n..i*n+n-1).

    prompt_ids: [B*n, P] left-padded; response_ids: [B*n, R] right-padded with pad_id;
    response_mask: [B*n, R], the model's tokens (a multi-turn episode's response holds the
    environment's tokens too, between its turns: attended, outside the mask); logps: [B*n, R]
    (0 outside the mask); finish: "stop" | "length"; prompt_index: [B*n] dataset index of each
    row's prompt; extras: per-row tensors [B*n] of a multi-turn rollout (rlhf.episodes:
    turns, tool calls, the environment's rewards ...), empty for a single-turn one.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    logps: torch.Tensor
    finish: list[str]
    prompt_index: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


def merge_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """Concatenate rollouts of several engines (prompt widths left-aligned to the widest)."""
    if len(parts) == 1:
        return parts[0]

    def left(rows: list[torch.Tensor], value) -> torch.Tensor:
        return pad([r.tolist() for t in rows for r in t], value, left=True, dtype=rows[0].dtype)

    def right(rows: list[torch.Tensor], value) -> torch.Tensor:
        return pad([r.tolist() for t in rows for r in t], value, dtype=rows[0].dtype)

    return Rollout(
        left([p.prompt_ids for p in parts], pad_id),
        left([p.prompt_mask for p in parts], False),
        right([p.response_ids for p in parts], pad_id),
        right([p.response_mask for p in parts], False),
        right([p.logps for p in parts], 0.0),
        [f for p in parts for f in p.finish],
        torch.cat([p.prompt_index for p in parts]),
        {k: torch.cat([p.extras[k] for p in parts]) for k in parts[0].extras},
    )


def select_rows(r: Rollout, rows: list[int]) -> Rollout:
    """The rollout's rows `rows`, in that order (widths unchanged)."""
    index = torch.tensor(rows, dtype=torch.long)
    return Rollout(
        r.prompt_ids[index],
        r.prompt_mask[index],
        r.response_ids[index],
        r.response_mask[index],
        r.logps[index],
        [r.finish[i] for i in rows],
        r.prompt_index[index],
        {k: v[index] for k, v in r.extras.items()},
    )


def response_attention(response_mask: torch.Tensor) -> torch.Tensor:
    """The response positions a forward attends to: up to each row's last model token, so the
    environment's tokens between a multi-turn episode's turns count (the same as the mask
    for a single-turn response, whose model tokens are a prefix)."""
    mask = response_mask.bool()
    return mask.flip(1).cummax(1).values.flip(1)


def sequences(r: Rollout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [B, T] and the action mask [B, T-1] of a rollout."""
    ids = torch.cat([r.prompt_ids, r.response_ids], dim=1)
    attention = torch.cat([r.prompt_mask, response_attention(r.response_mask)], dim=1)
    action = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool)
    width = r.prompt_ids.shape[1]
    action[:, width - 1 : width - 1 + r.response_ids.shape[1]] = r.response_mask
    return ids, attention, action


def rank_slices(rows: int, rank: int, world: int, micro: int) -> list[slice]:
    """Rank `rank`'s share of `rows` rows split evenly over `world` ranks, as micro-batches of
    at most `micro` rows (slices of the whole batch). The updates and make_experience's
    forwards split the same way."""
    per = rows // world
    lo = rank * per
    return [slice(lo + i, lo + min(i + micro, per)) for i in range(0, per, micro)]


def experience_inputs(
    parts: tuple[Rollout, ...], pad_id: int, rank: int, world: int, micro: int
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    """What a rank's per-token forward of make_experience takes, built from the engines'
    outputs themselves: its micro-batches of the merged sequences, and the first response
    column (log-probs are needed from there on)."""
    r = merge_rollouts(list(parts), pad_id)
    ids, attention, _ = sequences(r)
    chunks = rank_slices(ids.shape[0], rank, world, micro)
    return [(ids[c], attention[c]) for c in chunks], r.prompt_ids.shape[1] - 1


def rollout_token_logps(r: Rollout) -> torch.Tensor:
    """The engine's log-probs of a rollout in the [B, T-1] layout of `sequences` (0 outside
    the responses)."""
    return F.pad(r.logps.float(), (r.prompt_ids.shape[1] - 1, 0))


def save_rollouts(stem: Path, items: list[tuple[int, int, Rollout]]) -> None:
    """(step, policy version, rollout) items as `stem`.safetensors (the tensors) and
    `stem`.json (steps, versions, finish reasons): no pickle."""
    tensors, meta = {}, []
    for n, (step, version, r) in enumerate(items):
        for f in dataclasses.fields(r):
            value = getattr(r, f.name)
            if isinstance(value, torch.Tensor):
                tensors[f"{n}.{f.name}"] = value.contiguous()
        for key, value in r.extras.items():
            tensors[f"{n}.extras.{key}"] = value.contiguous()
        meta.append(
            {"step": step, "version": version, "finish": list(r.finish), "extras": list(r.extras)}
        )
    save_file(tensors, str(stem.with_suffix(".safetensors")))
    stem.with_suffix(".json").write_text(json.dumps(meta))


def load_rollouts(stem: Path) -> list[tuple[int, int, Rollout]]:
    """What save_rollouts wrote."""
    tensors = load_file(str(stem.with_suffix(".safetensors")))
    out = []
    for n, m in enumerate(json.loads(stem.with_suffix(".json").read_text())):
        fields = {
            f.name: m["finish"] if f.name == "finish" else tensors[f"{n}.{f.name}"]
            for f in dataclasses.fields(Rollout)
            if f.name != "extras"
        }
        fields["extras"] = {k: tensors[f"{n}.extras.{k}"] for k in m.get("extras", [])}
        out.append((m["step"], m["version"], Rollout(**fields)))
    return out
