"""Random tensor helpers. Shapes are numpy order (PyTorch order), i.e. the reverse of ggml `ne`."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

Tensor = npt.NDArray[np.floating]


def normal(rng: np.random.Generator, shape: tuple[int, ...], std: float, f16: bool) -> Tensor:
    # Sampled in float32 whatever the storage type, so F16 files match the F32 ones' statistics.
    values = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
    return values.astype(np.float16) if f16 else values


def linear(rng: np.random.Generator, n_out: int, n_in: int, f16: bool, gain: float = 1.0) -> Tensor:
    """A (n_out, n_in) matrix; std 1/sqrt(n_in) keeps activations O(1) through the layers."""
    return normal(rng, (n_out, n_in), gain / np.sqrt(n_in), f16)


def ones(n: int) -> Tensor:
    return np.ones(n, dtype=np.float32)


def zeros(n: int) -> Tensor:
    return np.zeros(n, dtype=np.float32)
