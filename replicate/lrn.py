"""Local response normalisation (§3.3), applied per column.

The paper's formula, with N maps and the sum clipped at the first and last map:

    b[i] = a[i] / (k + alpha * sum_{j=max(0, i-n/2)}^{min(N-1, i+n/2)} a[j]^2) ** beta

`alpha` here is always the coefficient of one squared activation, as printed in the paper.
`torch.nn.functional.local_response_norm` instead multiplies alpha by the *mean* of the n squares,
i.e. it divides alpha by n, so the paper's rule is `local_response_norm(a, n, alpha * n, beta, k)`.
The original 2012 code divides its configured `scale` by `size` the same way (layer.py, cmrnorm),
which is why the two rules below differ by a factor n in alpha.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

LRNRule = Literal["paper", "code2012", "off"]

# §3.3: "k = 2, n = 5, alpha = 10^-4, and beta = 0.75".
PAPER_SIZE = 5
PAPER_ALPHA = 1e-4
PAPER_BETA = 0.75
PAPER_K = 2.0


class ResponseNorm(nn.Module):
    """b = a / (k + alpha * sum of a^2 over `size` adjacent maps) ** beta, across the maps given.

    Give it one column's maps only: the original code normalised each GPU's maps separately
    (cmrnorm declared per GPU in the layer cfgs), so maps of the other column never enter the sum.
    """

    def __init__(
        self,
        size: int = PAPER_SIZE,
        alpha: float = PAPER_ALPHA,
        beta: float = PAPER_BETA,
        k: float = PAPER_K,
    ) -> None:
        super().__init__()
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        # torch divides its alpha by size; multiply it back so alpha is per squared activation.
        return F.local_response_norm(maps, self.size, self.alpha * self.size, self.beta, self.k)

    def extra_repr(self) -> str:
        return f"size={self.size}, alpha={self.alpha:g} (per squared map), beta={self.beta}, k={self.k}"


def response_norm(rule: LRNRule, k: float = PAPER_K) -> nn.Module:
    """The normalisation a layer gets under `rule`.

    paper:    alpha = 1e-4 per squared activation, as §3.3 prints it.
    code2012: the original code's rule, alpha = scale / size = 1e-4 / 5 (layer.py); its default
              k (`minDiv`) is 1, config #145 (the paper's net) sets 2.
    off:      no normalisation (the §3.3 ablation).
    """
    if rule == "paper":
        return ResponseNorm(PAPER_SIZE, PAPER_ALPHA, PAPER_BETA, k)
    if rule == "code2012":
        return ResponseNorm(PAPER_SIZE, PAPER_ALPHA / PAPER_SIZE, PAPER_BETA, k)
    if rule == "off":
        return nn.Identity()
    raise ValueError(f"unknown LRN rule {rule!r}: expected 'paper', 'code2012' or 'off'")
