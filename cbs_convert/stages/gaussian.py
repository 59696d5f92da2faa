"""The Gaussian fit of a data pool and its exact velocity: the part of v(x, t) a linear model gets
right, which the ``nonlinear`` monitors subtract.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from cbs_convert.families.base import broadcast_to


class GaussianFit:
    """The Gaussian with a pool's mean mu and covariance Sigma, and its exact velocity.

    For x0 ~ N(mu, Sigma) with Sigma = U diag(lambda) U^T, the velocity is linear in x:
    v_G(x, t) = alpha' mu + H(t) (x - alpha mu), with H = U diag(h(lambda)) U^T and, per direction,
    h(lambda) = (sigma sigma' + alpha alpha' lambda) / (alpha^2 lambda + sigma^2), which is half the
    t-derivative of the log of that direction's variance at time t. No division by sigma appears
    except through h(0) = sigma'/sigma, the exact velocity of a direction where the data is constant.

    Two representations:

    * exact (``basis`` spans everything, ``rest_variance`` is None): the full sample covariance,
      used when the pool has more samples than dimensions and D <= ``exact_dims``;
    * rank r plus a diagonal rest, for large D or small pools (a pool of N samples shows at most
      N - 1 directions, and the smallest of those are poorly estimated): the top r principal
      directions, r <= (N - 1) / 2, and a diagonal rest acting as P diag(h(d)) P with
      P = I - U U^T. Per coordinate j, d_j = (Sigma_jj - sum_i lambda_i U_ji^2) / P_jj: the variance
      the rest of the spectrum leaves at j, divided by the share of j that P keeps, so that
      P diag(d) P has the rest's total variance and equals it exactly when the rest is isotropic,
      whatever the directions of U (up to rounding where U holds nearly all of a coordinate, whose
      rest then weighs nothing). A constant pixel (Sigma_jj = 0, U_j = 0) gets d_j = 0 and its
      exact h(0). It is an approximation when the rest is neither isotropic nor diagonal.
    """

    def __init__(self, mean: torch.Tensor, basis: torch.Tensor, variances: torch.Tensor,
                 rest_variance: Optional[torch.Tensor] = None, description: str = ""):
        self.mean = mean.double().flatten()
        self.basis = basis.double()
        self.variances = variances.double().clamp_min(0.0)
        self.rest_variance = None if rest_variance is None else rest_variance.double().clamp_min(0.0)
        self.description = description
        self._cast: Dict[tuple, tuple] = {}

    @classmethod
    def from_moments(cls, mean: torch.Tensor, covariance: torch.Tensor) -> "GaussianFit":
        """Exact, from a known mean (any shape, D entries) and D x D covariance."""
        variances, basis = torch.linalg.eigh(covariance.double())
        return cls(mean, basis, variances, None, f"exact moments (D={basis.shape[0]})")

    @classmethod
    def from_pool(cls, x0_pool: torch.Tensor, max_rank: int = 256, exact_dims: int = 4096) -> "GaussianFit":
        """Mean and covariance of the pool's samples (see the class docstring for the two forms)."""
        flat = x0_pool.detach().flatten(1).double().cpu()
        n, d = flat.shape
        if n < 2:
            raise ValueError("a Gaussian fit needs at least 2 samples in the pool")
        mean = flat.mean(0)
        centred = flat - mean
        if n > d and d <= exact_dims:
            variances, basis = torch.linalg.eigh(centred.T @ centred / (n - 1))
            return cls(mean, basis, variances, None, f"exact sample covariance (D={d}, {n} samples)")
        # The principal directions come from whichever Gram matrix is smaller; eigh is deterministic,
        # so the fit does not consume any random state.
        if n <= d:
            gram_values, gram_vectors = torch.linalg.eigh(centred @ centred.T / (n - 1))
            order = torch.argsort(gram_values, descending=True)
            variances, sample_vectors = gram_values[order], gram_vectors[:, order]
        else:
            cov_values, cov_vectors = torch.linalg.eigh(centred.T @ centred / (n - 1))
            order = torch.argsort(cov_values, descending=True)
            variances, sample_vectors = cov_values[order], cov_vectors[:, order]
        positive = int((variances > 1e-12 * max(float(variances[0]), 1e-300)).sum())
        rank = max(0, min(max_rank, d, (n - 1) // 2, positive))
        variances = variances[:rank]
        if n <= d:
            basis = centred.T @ sample_vectors[:, :rank] / torch.sqrt(variances * (n - 1))
        else:
            basis = sample_vectors[:, :rank]
        return cls.low_rank(mean, basis, variances, centred.pow(2).sum(0) / (n - 1),
                            f"rank {rank} principal directions plus a diagonal rest (D={d}, {n} samples)")

    @classmethod
    def low_rank(cls, mean: torch.Tensor, basis: torch.Tensor, variances: torch.Tensor,
                 diagonal: torch.Tensor, description: str = "") -> "GaussianFit":
        """Orthonormal ``basis`` [D, r] with its ``variances``, and the covariance's ``diagonal``."""
        basis, variances = basis.double(), variances.double()
        left = diagonal.double() - (basis.pow(2) * variances).sum(1)
        # P_jj -> 0 where the basis holds all of coordinate j; the rest there is then weighed by ~0,
        # but the quotient amplifies the cancellation in ``left``. With U the top directions, d_j is
        # a weighted mean of the rest's eigenvalues, so the smallest kept variance bounds it.
        kept = (1.0 - basis.pow(2).sum(1)).clamp_min(1e-6)
        ceiling = float(variances.min()) if variances.numel() else float("inf")
        return cls(mean, basis, variances, (left.clamp_min(0.0) / kept).clamp_max(ceiling),
                   description or f"rank {basis.shape[1]} directions plus a diagonal rest (D={basis.shape[0]})")

    def _on(self, like: torch.Tensor):
        key = (like.device, like.dtype)
        if key not in self._cast:
            rest = None if self.rest_variance is None else self.rest_variance.to(device=like.device, dtype=like.dtype)
            self._cast[key] = (self.mean.to(device=like.device, dtype=like.dtype),
                               self.basis.to(device=like.device, dtype=like.dtype),
                               self.variances.to(device=like.device, dtype=like.dtype), rest)
        return self._cast[key]

    @staticmethod
    def _gain(variance, alpha, sigma, d_alpha, d_sigma):
        """h(lambda) for a [B] batch of times against variances of shape [V]: [B, V]."""
        a, s, da, ds = (c.reshape(-1, 1) for c in (alpha, sigma, d_alpha, d_sigma))
        return (s * ds + a * da * variance) / (a * a * variance + s * s)

    def jacobian_product(self, u, alpha, sigma, d_alpha, d_sigma) -> torch.Tensor:
        """(d v_G / d x) u for a batch of tangents u at canonical times with the given schedule values."""
        _, basis, variances, rest = self._on(u)
        flat = u.reshape(u.shape[0], -1)
        if flat.shape[1] != basis.shape[0]:
            raise ValueError(f"the Gaussian fit has {basis.shape[0]} dimensions, the samples {flat.shape[1]}")
        coords = flat @ basis
        out = (self._gain(variances, alpha, sigma, d_alpha, d_sigma) * coords) @ basis.T
        if rest is not None:
            remainder = self._gain(rest, alpha, sigma, d_alpha, d_sigma) * (flat - coords @ basis.T)
            out = out + remainder - (remainder @ basis) @ basis.T
        return out.reshape(u.shape)

    def velocity(self, x, alpha, sigma, d_alpha, d_sigma) -> torch.Tensor:
        """v_G(x) = alpha' mu + H (x - alpha mu); differentiable in the schedule values."""
        mean = self._on(x)[0].reshape(1, *x.shape[1:])
        return broadcast_to(d_alpha, x) * mean + self.jacobian_product(x - broadcast_to(alpha, x) * mean, alpha, sigma, d_alpha, d_sigma)
