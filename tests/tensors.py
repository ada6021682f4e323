"""Tensor helpers shared by the loss, estimator and op tests (reference computations run in
float64)."""

from __future__ import annotations

import torch

F64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_close(actual: torch.Tensor, expected, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    expected = torch.as_tensor(expected, dtype=F64)
    torch.testing.assert_close(actual.detach().to(F64), expected, rtol=rtol, atol=atol)


def random_mask(B: int, T: int, g: torch.Generator) -> torch.Tensor:
    """[B, T] masks of random lengths 1..T, left-aligned."""
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    return torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
