"""Low-rank adapters on the q/k/v slices of a fused ``qkv`` linear.

:class:`LoRAQKV` replaces a block's ``attn.qkv``. It keeps the frozen weight and bias under their
original names (so timm checkpoints still load) and holds, per adapter, ``A`` (P x r x d_in, Kaiming
uniform) and ``B`` (P x d_out x r, zero) for its P targeted projections. All adapters of a projection are
applied as one stacked low-rank product in weight space, ``B_stack diag(s) A_stack`` of rank ``r * n``:
its cost does not grow with the batch, so a step costs nearly the same with 1 adapter or 20.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["QKV_LETTERS", "LoRAQKV", "direction_norms"]

QKV_LETTERS = "qkv"


def direction_norms(a: Tensor, b: Tensor) -> Tensor:
    """``||B A||_F`` over the last two dimensions, from ``sum((B^T B) * (A A^T))`` (r x r work only).

    Clamped away from zero so that a zero update normalises to a zero direction, gradients included.
    """
    squared = ((b.transpose(-1, -2) @ b) * (a @ a.transpose(-1, -2))).sum(dim=(-1, -2))
    return squared.clamp_min(torch.finfo(squared.dtype).tiny).sqrt()


class LoRAQKV(nn.Module):
    """A fused ``qkv`` linear with a growing bank of low-rank adapters on some of its slices.

    The owning model sets, before each forward, which adapters are active, their coefficients
    (``beta_i * alpha_i``) and which of them are consolidated (normalised by ``||B A||_F``); in
    evaluation it may instead set ``merged_weight``.

    Args:
        qkv: the frozen ``nn.Linear`` producing q, k and v concatenated (``out = 3 * d_out``).
        rank: the adapters' rank r.
        targets: the slices that get adapters, a subset of ``"qkv"``.
    """

    def __init__(self, qkv: nn.Linear, rank: int, targets: str = "qv"):
        super().__init__()
        self.in_features = qkv.in_features
        self.out_features = qkv.out_features
        self.slice_features = qkv.out_features // 3
        self.rank = rank
        self.targets = "".join(letter for letter in QKV_LETTERS if letter in targets)
        self.weight = qkv.weight
        self.bias = qkv.bias
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        rows = [
            torch.arange(self.slice_features) + QKV_LETTERS.index(letter) * self.slice_features
            for letter in self.targets
        ]
        self.register_buffer("target_rows", torch.cat(rows), persistent=False)
        self.active: list[int] = []
        self.coefficients: Tensor | None = None
        self.normalised: Tensor | None = None
        self.merged_weight: Tensor | None = None

    @property
    def num_projections(self) -> int:
        return len(self.targets)

    def add_adapter(self) -> None:
        """Append one adapter: ``A`` Kaiming-uniform, ``B`` zero, so the output is unchanged."""
        weight = self.weight
        a = torch.empty(self.num_projections, self.rank, self.in_features, device=weight.device)
        for projection in a:
            nn.init.kaiming_uniform_(projection, a=math.sqrt(5))
        b = torch.zeros(self.num_projections, self.slice_features, self.rank, device=weight.device)
        self.lora_A.append(nn.Parameter(a.to(weight.dtype)))
        self.lora_B.append(nn.Parameter(b.to(weight.dtype)))

    def set_adapter_trainable(self, index: int, trainable: bool) -> None:
        self.lora_A[index].requires_grad_(trainable)
        self.lora_B[index].requires_grad_(trainable)

    def stacked(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        """``A`` (n, P, r, d_in) and ``B`` (n, P, d_out, r) of the given adapters."""
        return (
            torch.stack([self.lora_A[i] for i in indices]),
            torch.stack([self.lora_B[i] for i in indices]),
        )

    def effective_weight(
        self, indices: list[int], coefficients: Tensor, normalised: Tensor
    ) -> Tensor:
        """The frozen weight plus ``sum_i c_i D_i^p`` on every targeted slice p.

        ``D_i^p`` is ``B A / ||B A||_F`` where ``normalised[i]``, else the raw ``B A``.
        """
        if not indices:
            return self.weight
        n, r = len(indices), self.rank
        a, b = self.stacked(indices)
        scales = coefficients.to(b.dtype)[:, None].expand(n, self.num_projections)
        if bool(normalised.any()):
            norms = torch.where(normalised[:, None], direction_norms(a, b), torch.ones_like(scales))
            scales = scales / norms
        b = b * scales[:, :, None, None]
        b_stack = b.permute(1, 2, 0, 3).reshape(self.num_projections, self.slice_features, n * r)
        a_stack = a.permute(1, 0, 2, 3).reshape(self.num_projections, n * r, self.in_features)
        delta = torch.bmm(b_stack, a_stack).reshape(-1, self.in_features).to(self.weight.dtype)
        return self.weight.index_add(0, self.target_rows, delta)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged_weight is not None and not torch.is_grad_enabled():
            return F.linear(x, self.merged_weight, self.bias)
        if self.coefficients is None or self.normalised is None:
            raise RuntimeError(
                "LoRAQKV is driven by SDLoRAViT, which sets its adapters' coefficients"
            )
        weight = self.effective_weight(self.active, self.coefficients, self.normalised)
        return F.linear(x, weight, self.bias)

    def __getstate__(self) -> dict:
        """Drop the per-forward state (it may hold autograd graphs, which neither pickle nor copy)."""
        state = self.__dict__.copy()
        state.update(active=[], coefficients=None, normalised=None, merged_weight=None)
        return state

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, targets={self.targets!r}, adapters={len(self.lora_A)}"
        )
