"""Large, realistic synthetic codebooks: keys like HoReN's real queries, and queries for them.

A key is a normalized draw x / ||x|| of an anisotropic Gaussian x ~ N(mean, F F^T + s^2 I) (F: a
low-rank factor of the covariance). ``ActivationModel.load()`` reads the mean, factor and noise
fitted to SmolLM2-135M's down_proj inputs on ZsRE prompts (the query HoReN uses: the mean of the
wrapped layer's input over the last 60% of prompt tokens). The fit ships inside the package
(``FIT_FILE``, horen_fast/resources/, about 400 KB; bench/fit_activations.py rewrites it).
``ActivationModel.anisotropic()`` is a stand-in to ask for explicitly (pairwise key cosine about
0.5, a decaying spectrum), e.g. for other dimensions.

Queries:
- ``paraphrases(keys, ...)``: near a stored key, at a cosine drawn from the fitted distribution of
  cosines between a ZsRE prompt's key and its rephrase's key (or uniform in [0.75, 0.99] without a
  fit), in a direction drawn from the same covariance (so the difference is anisotropic too);
- ``unrelated(n)``: fresh draws from the same distribution (another prompt, not stored).

Keys are generated in float32 chunks (``chunk`` rows at a time) and can be written straight into
a preallocated tensor of any floating dtype, so 1M x 1536 keys need 6 GB in float32 (3 GB in
bfloat16) plus one chunk, never a second full copy.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["ActivationModel", "FIT_FILE", "KIND"]

FIT_FILE = Path(__file__).resolve().parent / "resources" / "smollm2_zsre_activations.safetensors"
KIND = "horen_fast.ActivationModel"


@dataclass
class ActivationModel:
    mean: torch.Tensor            # [d] float32
    factor: torch.Tensor          # [d, r] float32
    noise_std: float
    paraphrase_cos: torch.Tensor  # [m] sorted quantiles of the paraphrase cosine (empty: default)
    source: str

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    @classmethod
    def load(cls, path=None) -> "ActivationModel":
        """The model fitted to real activations: ``path``, or the fit shipped with the package."""
        path = Path(path) if path is not None else FIT_FILE
        if not path.is_file():
            hint = ("the package is incomplete: reinstall horen-fast" if path == FIT_FILE else
                    "pass the file bench/fit_activations.py wrote, or use ActivationModel.anisotropic()")
            raise FileNotFoundError(f"no fitted activation model at {path}; {hint}")
        from ._files import load_tensors

        t, meta = load_tensors(path, KIND)
        return cls(t["mean"].float(), t["factor"].float(), float(t["noise_std"][0]),
                   t["paraphrase_cos"].float(), f"fitted: {meta.get('model')} ({path.name})")

    @classmethod
    def anisotropic(cls, d: int = 1536, rank: int = 64, seed: int = 0) -> "ActivationModel":
        """A stand-in: keys with pairwise cosine about 0.5 and a decaying covariance spectrum."""
        g = torch.Generator().manual_seed(seed)
        mean = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
        basis, _ = torch.linalg.qr(torch.randn(d, rank, generator=g))
        spectrum = 0.6 * (1.0 + torch.arange(rank, dtype=torch.float32)) ** -0.5
        factor = basis * (spectrum / spectrum.norm())           # total variance 0.36 in the factor
        noise_std = (0.64 / d) ** 0.5                            # 0.64 spread over every direction
        return cls(mean, factor, noise_std, torch.empty(0), f"anisotropic stand-in (d={d}, rank={rank})")

    # ---- drawing ------------------------------------------------------------------------------
    def _raw(self, n: int, g: torch.Generator, centered: bool = False) -> torch.Tensor:
        z = torch.randn(n, self.factor.shape[1], generator=g)
        x = z @ self.factor.T + self.noise_std * torch.randn(n, self.dim, generator=g)
        return x if centered else x + self.mean

    def keys(self, n: int, *, seed: int = 0, dtype: torch.dtype = torch.float32, chunk: int = 65536,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """n unit keys [n, d], generated in float32 chunks; written into ``out`` when given."""
        if out is None:
            out = torch.empty(n, self.dim, dtype=dtype)
        elif out.shape != (n, self.dim):
            raise ValueError(f"out must be [{n}, {self.dim}], got {tuple(out.shape)}")
        for lo, block in self.iter_keys(n, seed=seed, chunk=chunk):
            out[lo: lo + block.shape[0]] = block
        return out

    def iter_keys(self, n: int, *, seed: int = 0, chunk: int = 65536):
        """Yield (start row, float32 unit keys [<= chunk, d]) covering n keys."""
        g = torch.Generator().manual_seed(seed)
        for lo in range(0, n, chunk):
            yield lo, torch.nn.functional.normalize(self._raw(min(chunk, n - lo), g), dim=1)

    def paraphrase_cosines(self, n: int, g: torch.Generator) -> torch.Tensor:
        u = torch.rand(n, generator=g)
        qs = self.paraphrase_cos
        if qs.numel() < 2:
            return 0.75 + 0.24 * u
        pos = u * (qs.numel() - 1)
        lo = pos.floor().long().clamp(max=qs.numel() - 2)
        frac = pos - lo
        return qs[lo] * (1 - frac) + qs[lo + 1] * frac           # inverse of the empirical CDF

    def paraphrases(self, keys: torch.Tensor, *, seed: int = 1, cos: torch.Tensor | None = None) -> torch.Tensor:
        """One query per given key [b, d], unit norm, at cosine ``cos`` (drawn from the fitted
        paraphrase distribution by default) with it, displaced along an anisotropic direction."""
        g = torch.Generator().manual_seed(seed)
        k = torch.nn.functional.normalize(keys.float().cpu(), dim=1)
        b = k.shape[0]
        t = (cos if cos is not None else self.paraphrase_cosines(b, g)).float().clamp(-1, 1)
        delta = self._raw(b, g, centered=True)
        delta = torch.nn.functional.normalize(delta - (delta * k).sum(1, keepdim=True) * k, dim=1)
        return t[:, None] * k + (1 - t * t).clamp(min=0).sqrt()[:, None] * delta

    def unrelated(self, n: int, *, seed: int = 2) -> torch.Tensor:
        """n unit queries from the keys' distribution (prompts that were not edited)."""
        g = torch.Generator().manual_seed(10_000 + seed)
        return torch.nn.functional.normalize(self._raw(n, g), dim=1)
