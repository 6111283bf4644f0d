"""Low-rank adapters on the q/k/v slices of a fused ``qkv`` linear.

:class:`LoRAQKV` replaces a block's ``attn.qkv``. It keeps the frozen weight and bias under their
original names (so timm checkpoints still load) and holds, per adapter, ``A`` (P x r_i x d_in, Kaiming
uniform) and ``B`` (P x d_out x r_i, zero) for its P targeted projections; adapters may differ in rank
(SD-LoRA-RR). All adapters of a projection are applied as one low-rank product in weight space,
``B_cat diag(s) A_cat`` with the factors concatenated along the rank (``sum_i r_i``): its cost does not
grow with the batch, so a step costs nearly the same with 1 adapter or 20.

Per adapter and projection the layer also keeps a magnitude correction and an ``absorbed`` flag
(SD-LoRA-KD): an absorbed slice leaves the product, and its contribution lives on in the corrections of
the adapters it was fitted on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["QKV_LETTERS", "LoRAQKV", "direction_norms"]

QKV_LETTERS = "qkv"


def targets_problem(targets: str) -> str | None:
    """What is wrong with ``targets``, the slices of ``qkv`` that get adapters (``None``: fine)."""
    if not targets or set(targets) - set(QKV_LETTERS) or len(set(targets)) != len(targets):
        return "must be distinct letters from 'q', 'k', 'v' (e.g. 'qv')"
    return None


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
        rank: the rank of adapters added without one of their own.
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
        projections = self.num_projections
        self.register_buffer("corrections", torch.zeros(0, projections, device=qkv.weight.device))
        """Per adapter and projection, a fixed magnitude added to the adapter's coefficient."""
        self.register_buffer(
            "absorbed", torch.zeros(0, projections, dtype=torch.bool, device=qkv.weight.device)
        )
        """Per adapter and projection, whether the slice was absorbed (it no longer acts)."""
        self.active: list[int] = []
        self.coefficients: Tensor | None = None
        self.normalised: Tensor | None = None
        self.merged_weight: Tensor | None = None

    @property
    def num_projections(self) -> int:
        return len(self.targets)

    def adapter_rank(self, index: int) -> int:
        return self.lora_A[index].shape[1]

    def _ranks(self, indices: list[int], device: torch.device) -> Tensor:
        return torch.tensor([self.adapter_rank(i) for i in indices], device=device)

    def add_adapter(self, rank: int | None = None) -> None:
        """Append one adapter of ``rank`` (default ``self.rank``): ``A`` Kaiming-uniform, ``B`` zero,
        so the output is unchanged."""
        rank = self.rank if rank is None else rank
        weight = self.weight
        a = torch.empty(self.num_projections, rank, self.in_features, device=weight.device)
        for projection in a:
            nn.init.kaiming_uniform_(projection, a=math.sqrt(5))
        b = torch.zeros(self.num_projections, self.slice_features, rank, device=weight.device)
        self.lora_A.append(nn.Parameter(a.to(weight.dtype)))
        self.lora_B.append(nn.Parameter(b.to(weight.dtype)))
        self.corrections = torch.cat([self.corrections, self.corrections.new_zeros(1, a.shape[0])])
        self.absorbed = torch.cat([self.absorbed, self.absorbed.new_zeros(1, a.shape[0])])

    def set_adapter_trainable(self, index: int, trainable: bool) -> None:
        """Train or freeze one adapter's A and B; freezing drops their gradients."""
        for param in (self.lora_A[index], self.lora_B[index]):
            param.requires_grad_(trainable)
            if not trainable:
                param.grad = None

    def stacked(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        """``A`` (n, P, r, d_in) and ``B`` (n, P, d_out, r) of adapters of one rank r."""
        return (
            torch.stack([self.lora_A[i] for i in indices]),
            torch.stack([self.lora_B[i] for i in indices]),
        )

    def concatenated(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        """``A`` (P, R, d_in) and ``B`` (P, d_out, R), R the sum of the adapters' ranks, adapter by
        adapter: ``B A`` is the sum of the adapters' products."""
        return (
            torch.cat([self.lora_A[i] for i in indices], dim=1),
            torch.cat([self.lora_B[i] for i in indices], dim=2),
        )

    def direction_norms(self, indices: list[int]) -> Tensor:
        """``||B^p A^p||_F`` (n, P) of the given adapters, one batched product per distinct rank."""
        by_rank: dict[int, list[int]] = {}
        for k, index in enumerate(indices):
            by_rank.setdefault(self.adapter_rank(index), []).append(k)
        groups = list(by_rank.values())
        norms = torch.cat(
            [direction_norms(*self.stacked([indices[k] for k in group])) for group in groups]
        )
        if len(groups) == 1:
            return norms
        order = torch.tensor([k for group in groups for k in group], device=norms.device)
        return norms[torch.argsort(order)]

    def gram(self, indices: list[int]) -> Tensor:
        """``<B_i^p A_i^p, B_j^p A_j^p>_F`` (P, n, n) in float64, from r x r products only."""
        a, b = (t.detach().double() for t in self.concatenated(indices))
        ranks = self._ranks(indices, a.device)
        segments = F.one_hot(
            torch.arange(len(indices), device=a.device).repeat_interleave(ranks), len(indices)
        ).double()  # (R, n): which adapter each rank column belongs to
        products = (b.transpose(-1, -2) @ b) * (a @ a.transpose(-1, -2))
        return segments.T @ products @ segments

    def effective_weight(
        self, indices: list[int], coefficients: Tensor, normalised: Tensor
    ) -> Tensor:
        """The frozen weight plus ``sum_i s_i^p D_i^p`` on every targeted slice p.

        ``s_i^p`` is the adapter's coefficient plus its correction on p (0 where absorbed);
        ``D_i^p`` is ``B A / ||B A||_F`` where ``normalised[i]``, else the raw ``B A``.
        """
        if not indices:
            return self.weight
        a, b = self.concatenated(indices)
        scales = coefficients.to(b.dtype)[:, None] + self.corrections[indices].to(b.dtype)
        scales = scales.masked_fill(self.absorbed[indices], 0.0)
        if bool(normalised.any()):
            norms = self.direction_norms(indices)
            scales = scales / torch.where(normalised[:, None], norms, torch.ones_like(norms))
        columns = scales.repeat_interleave(
            self._ranks(indices, b.device), dim=0, output_size=b.shape[-1]
        )  # (R, P)
        delta = torch.bmm(b * columns.T[:, None, :], a).reshape(-1, self.in_features)
        return self.weight.index_add(0, self.target_rows, delta.to(self.weight.dtype))

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
