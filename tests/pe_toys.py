"""A small Private Evolution problem shared by tests/test_private_evolution.py and tests/pe_dist_run.py:
three classes of 2-d points, a public generator that knows nothing of where they are."""

from __future__ import annotations

import torch

from lightning_dp.mechanism.private_evolution import PrivateEvolution

CENTRES = torch.tensor([[4.0, 0.0], [0.0, 4.0], [-4.0, -4.0]])


def private_set(n: int = 240) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    y = torch.arange(n) % 3
    return CENTRES[y] + 0.5 * torch.randn(n, 2, generator=g), y


def random_api(label: int, n: int) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(100 + label)) * 5


def variation_api(samples: torch.Tensor, strength: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(samples.abs().sum().item() * 1000) % 2**31)  # deterministic, public
    return samples + strength * 2 * torch.randn(samples.shape, generator=g)


def toy_evolution(**kw: object) -> PrivateEvolution:
    args = dict(num_samples=60, iterations=4, epsilon=4.0, delta=1e-5, threshold=1.0, classes=[0, 1, 2],
                progress=False, generator=torch.Generator().manual_seed(0))
    args.update(kw)
    return PrivateEvolution(random_api, variation_api, embed=lambda s: s, **args)  # type: ignore[arg-type]
