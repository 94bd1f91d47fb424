"""Random draws that follow the data's device and, for sampling, each sample's own stream.

Every random number of the library comes from an explicit generator (docs/design.md, "The core abstraction"):

- a `torch.Generator`: one stream for the whole batch, as in training (losses, time draws);
- a `SampleGenerators`: one `torch.Generator` per sample, seeded from (seed, global sample index), so
  sample i draws the same numbers whatever the batch it is in, the batch size or the number of processes
  (the idea of EDM's StackedRandomGenerator, Karras et al. 2022, arXiv:2206.00364, code release);
- an `InterpolatedNoise`: rows of frames between the per-sample draws of samples 2p and 2p + 1, mixed by
  NCSNv2's cos/sin weights or by slerp, for interpolation (pipeline.interpolate). Its end frames are those
  samples' own draws, bit for bit.

`randn` is duck-typed: anything but a torch.Generator (or None) draws itself through its `randn` method.

Draws are made where the generator lives (the CPU for a default torch.Generator and for every
SampleGenerators) and then moved to the data's device, so the bits do not depend on the device either.
`randn_like(x, g)` with a CPU torch.Generator is exactly `torch.randn(x.shape, generator=g, dtype=x.dtype)`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index`'s generator: a well-mixed 64-bit function of (seed, index).

    numpy's SeedSequence hashes the pair, so neighbouring pairs ((0, 1) and (1, 0), or seed + index
    collisions) give unrelated streams; the uint64 it returns is a valid torch seed.
    """
    if seed < 0 or index < 0:
        raise ValueError(f"seed and sample index must be >= 0, got ({seed}, {index})")
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint64)[0])


class SampleGenerators:
    """One torch.Generator per sample, seeded from (seed, index) for each global sample index.

    `indices` are the samples' positions in the whole run, e.g. range(start, start + b) for the batch
    that starts at sample `start`: any split of the same indices into batches draws the same numbers.
    Row i of every draw comes from generator i alone, on the CPU, then moves to `device`.

    Cost: one small call per sample and draw, about 3 us: 10,000 samples of shape (2,) take ~30 ms per
    draw against ~0.06 ms with one generator (2 shared CPU cores); for images the draw itself dominates
    (10,000 x 3 x 32 x 32: ~0.31 s either way). Building 10,000 generators takes ~0.2 s.
    """

    def __init__(self, seed: int, indices: Sequence[int]):
        self.seed = int(seed)
        self.indices = [int(i) for i in indices]
        self.generators = [torch.Generator().manual_seed(sample_seed(self.seed, i)) for i in self.indices]

    def __len__(self) -> int:
        return len(self.generators)

    def __repr__(self) -> str:
        return f"SampleGenerators(seed={self.seed}, {len(self)} samples)"

    def _check(self, shape: Sequence[int]) -> tuple[int, ...]:
        shape = tuple(int(s) for s in shape)
        if not shape or shape[0] != len(self):
            raise ValueError(f"a draw from {len(self)} sample generators needs shape ({len(self)}, ...), got {shape}")
        return shape

    def _fill(self, fill, shape: Sequence[int], dtype: torch.dtype, device) -> Tensor:
        """A CPU tensor of `shape` whose contiguous row i is filled in place by fill(row, generator i), moved to device.

        Filling row views in place is torch.randn(row shape, generator=g) bit for bit, a little faster than
        stacking separate draws; the cost is one small call per sample.
        """
        out = torch.empty(self._check(shape), dtype=dtype)
        for row, g in zip(out, self.generators):
            fill(row, g)
        return out if device is None else out.to(device)

    def randn(self, shape: Sequence[int], *, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
        """Standard normal draws of `shape` (shape[0] == len(self)), row i from sample i's generator."""
        return self._fill(lambda row, g: row.normal_(generator=g), shape, dtype, device)

    def rand(self, shape: Sequence[int], *, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
        """Uniform [0, 1) draws of `shape` (shape[0] == len(self)), row i from sample i's generator."""
        return self._fill(lambda row, g: row.uniform_(generator=g), shape, dtype, device)

    def randint(self, high: int, shape: Sequence[int], *, dtype: torch.dtype = torch.int64, device=None) -> Tensor:
        """Integers in [0, high) of `shape` (shape[0] == len(self)), row i from sample i's generator."""
        return self._fill(lambda row, g: row.copy_(torch.randint(high, row.shape, generator=g, dtype=dtype)),
                          shape, dtype, device)

    def get_state(self) -> list[Tensor]:
        """Every sample's generator state (to checkpoint or replay a draw)."""
        return [g.get_state() for g in self.generators]

    def set_state(self, states: Sequence[Tensor]) -> None:
        if len(states) != len(self):
            raise ValueError(f"{len(states)} states for {len(self)} sample generators")
        for g, s in zip(self.generators, states):
            g.set_state(s)


INTERPOLATIONS = ("ncsnv2", "slerp")


def _check_interpolation(scheme: str, frames: int) -> None:
    if scheme not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation scheme {scheme!r}; allowed: {', '.join(INTERPOLATIONS)}")
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 2:
        raise ValueError(f"an interpolation needs frames >= 2 (its two ends at least), got {frames!r}")


def interpolation_weights(scheme: str, frames: int, z_p: Tensor, z_q: Tensor) -> tuple[Tensor, Tensor]:
    """(a, b), each (P, K) float64: frame k of pair j is a[j, k] z_p[j] + b[j, k] z_q[j], for z_p, z_q (P, *D).

    ncsnv2: a = cos phi, b = sin phi, phi = linspace(0, pi/2, K) (Song & Ermon 2020, arXiv:2006.09011, appendix B.2;
    their anneal_Langevin_dynamics_interpolation), so every frame of independent N(0, I) ends is N(0, I).
    slerp: a = sin((1 - alpha) theta) / sin theta, b = sin(alpha theta) / sin theta, alpha = linspace(0, 1, K), theta
    the angle between the flattened z_p[j] and z_q[j] (Shoemake 1985; DDIM, arXiv:2010.02502, sec. 5.3); linear
    interpolation where sin theta vanishes (parallel or opposite ends). Frames 0 and K-1 weigh (1, 0) and (0, 1)
    exactly, so they are z_p and z_q bit for bit.
    """
    _check_interpolation(scheme, frames)
    pairs = z_p.shape[0]
    if scheme == "ncsnv2":
        phi = torch.linspace(0.0, math.pi / 2, frames, dtype=torch.float64)
        a, b = torch.cos(phi).expand(pairs, -1).clone(), torch.sin(phi).expand(pairs, -1).clone()
    else:
        p, q = z_p.reshape(pairs, -1).to(torch.float64), z_q.reshape(pairs, -1).to(torch.float64)
        p_hat = p / p.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        q_hat = q / q.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        # 2 atan2(|p - q|, |p + q|) of the unit vectors is accurate at every angle, where acos of the dot is not
        theta = (2 * torch.atan2((p_hat - q_hat).norm(dim=1), (p_hat + q_hat).norm(dim=1)))[:, None]
        alpha = torch.linspace(0.0, 1.0, frames, dtype=torch.float64)[None]
        sin = torch.sin(theta)
        degenerate = sin.abs() < 1e-12
        safe = torch.where(degenerate, torch.ones_like(sin), sin)
        a = torch.where(degenerate, 1 - alpha, torch.sin((1 - alpha) * theta) / safe)
        b = torch.where(degenerate, alpha.expand(pairs, -1), torch.sin(alpha * theta) / safe)
    # cos(pi/2) is 6e-17, not 0: the ends are set, not computed
    a[:, 0], b[:, 0], a[:, -1], b[:, -1] = 1.0, 0.0, 0.0, 1.0
    return a, b


class InterpolatedNoise:
    """Noise for interpolation: len(pairs) * frames rows, row r = frame k = r % frames of pair j = r // frames.

    Every draw takes z_p, z_q from the per-sample generators of samples 2 pairs[j] and 2 pairs[j] + 1, seeded as
    SampleGenerators(seed, [index]) and kept between draws, so frames 0 and frames-1 are exactly the draws those
    two samples make in an ordinary run with the same seed; the frames between are interpolation_weights(scheme)
    mixes of them, computed on the CPU in the requested dtype, then moved to `device`. A draw costs two
    per-sample draws per pair, whatever the number of frames.
    """

    def __init__(self, seed: int, pairs: Sequence[int], frames: int, scheme: str):
        _check_interpolation(scheme, frames)
        self.pairs = [int(p) for p in pairs]
        if not self.pairs:
            raise ValueError("an interpolation needs at least one pair")
        self.frames, self.scheme = frames, scheme
        # rows 2j and 2j + 1 are the ends of pair j
        self.ends = SampleGenerators(seed, [2 * p + e for p in self.pairs for e in (0, 1)])
        self.seed = self.ends.seed

    def __len__(self) -> int:
        return len(self.pairs) * self.frames

    def __repr__(self) -> str:
        return (f"InterpolatedNoise(seed={self.seed}, {len(self.pairs)} pairs x {self.frames} frames, "
                f"{self.scheme})")

    def randn(self, shape: Sequence[int], *, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
        """Interpolated standard normal draws of `shape` (shape[0] == len(self)), frames of pair j in rows
        j * frames ... (j + 1) * frames - 1."""
        shape = tuple(int(s) for s in shape)
        if not shape or shape[0] != len(self):
            raise ValueError(f"a draw of {len(self.pairs)} pairs x {self.frames} frames needs shape "
                             f"({len(self)}, ...), got {shape}")
        ends = self.ends.randn((2 * len(self.pairs), *shape[1:]), dtype=dtype)
        z_p, z_q = ends[0::2], ends[1::2]
        a, b = interpolation_weights(self.scheme, self.frames, z_p, z_q)
        bcast = (len(self.pairs), self.frames) + (1,) * (len(shape) - 1)
        z = a.to(dtype).reshape(bcast) * z_p[:, None] + b.to(dtype).reshape(bcast) * z_q[:, None]
        # 1 z_p + 0 z_q would turn a -0.0 of z_p into +0.0: the ends are copied, not mixed
        z[:, 0], z[:, -1] = z_p, z_q
        z = z.reshape(shape)
        return z if device is None else z.to(device)

    def rand(self, shape: Sequence[int], *, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
        raise NotImplementedError("InterpolatedNoise interpolates normal draws only; no uniform draw has an "
                                  "interpolation here (use SampleGenerators or a torch.Generator for rand)")

    def randint(self, high: int, shape: Sequence[int], *, dtype: torch.dtype = torch.int64, device=None) -> Tensor:
        raise NotImplementedError("InterpolatedNoise interpolates normal draws only; no integer draw has an "
                                  "interpolation here (use SampleGenerators or a torch.Generator for randint)")

    def get_state(self) -> list[Tensor]:
        """The end generators' states, z_p and z_q of each pair in turn."""
        return self.ends.get_state()

    def set_state(self, states: Sequence[Tensor]) -> None:
        self.ends.set_state(states)


Generator = Union[torch.Generator, SampleGenerators, InterpolatedNoise, None]


def randn(shape: Sequence[int], generator: Generator, *, dtype: Optional[torch.dtype] = None, device=None) -> Tensor:
    """Standard normal noise of `shape` from any kind of generator, returned on `device`.

    A torch.Generator (or None, the global one) draws the whole tensor on its own device, as
    torch.randn(shape, generator=g, dtype=dtype) does; anything else draws itself with its
    randn(shape, dtype=, device=) (SampleGenerators row by row, InterpolatedNoise frame by frame).
    """
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if generator is not None and not isinstance(generator, torch.Generator):
        if not callable(getattr(generator, "randn", None)):
            raise TypeError(f"a generator is a torch.Generator, None or an object with randn(shape, dtype=, "
                            f"device=) (SampleGenerators, InterpolatedNoise), got {type(generator).__name__}")
        return generator.randn(shape, dtype=dtype, device=device)
    where = generator.device if generator is not None else None
    z = torch.randn(tuple(shape), generator=generator, dtype=dtype, device=where)
    return z if device is None else z.to(device)


def randn_like(x: Tensor, generator: Generator) -> Tensor:
    """Noise shaped like x, of x's dtype, on x's device, from any kind of generator (see `randn`)."""
    return randn(x.shape, generator, dtype=x.dtype, device=x.device)
