"""SD-LoRA on a frozen timm Vision Transformer, as an Avalanche dynamic module.

For every targeted projection p the network uses ``W^p = W0^p + sum_i beta_i * alpha_i * D_i^p`` over
the active adapters (docs/METHOD.md). Avalanche's model adaptation grows the model: one adapter per training
experience and a linear head over every class seen so far.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from avalanche.benchmarks import CLExperience
from avalanche.models import BaseModel, DynamicModule, IncrementalClassifier
from torch import Tensor, nn

from avalanche_sdlora import adapter_files
from avalanche_sdlora.absorption import DirectionFit, fit_direction
from avalanche_sdlora.adapters import QKV_LETTERS, LoRAQKV, direction_norms, targets_problem
from avalanche_sdlora.gate import GumbelGate

__all__ = ["SDLoRAViT"]


def _check_backbone(backbone: nn.Module) -> None:
    expected = (
        "expected a timm VisionTransformer: .blocks[i].attn.qkv fused nn.Linear layers, "
        "forward_features(), forward_head() and num_features"
    )
    blocks = getattr(backbone, "blocks", None)
    if not isinstance(blocks, nn.Module) or len(list(blocks.children())) == 0:
        raise TypeError(f"{type(backbone).__name__} has no ViT blocks; {expected}")
    for index, block in enumerate(blocks.children()):
        qkv = getattr(getattr(block, "attn", None), "qkv", None)
        if isinstance(qkv, LoRAQKV):
            raise TypeError(f"block {index} already has adapters: wrap a bare backbone once")
        if not isinstance(qkv, nn.Linear) or qkv.out_features % 3:
            raise TypeError(f"block {index} has no fused attn.qkv linear (got {qkv!r}); {expected}")
    for name in ("forward_features", "forward_head", "num_features"):
        if not hasattr(backbone, name):
            raise TypeError(f"{type(backbone).__name__} has no {name}; {expected}")


def _check_targets(targets: str) -> str:
    if not isinstance(targets, str):
        raise TypeError(f"targets must be a string of letters from 'qkv', got {targets!r}")
    if (problem := targets_problem(targets)) is not None:
        raise ValueError(f"targets {problem}, got {targets!r}")
    return targets


def _check_blocks(blocks: Iterable[int] | None, num_blocks: int) -> list[int]:
    if blocks is None:
        return list(range(num_blocks))
    chosen = list(blocks)
    if not chosen:
        raise ValueError("blocks must name at least one block (or be None for all)")
    for index in chosen:
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"block indices must be ints, got {index!r}")
        if not 0 <= index < num_blocks:
            raise ValueError(f"block index {index} is out of range 0..{num_blocks - 1}")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"block indices must be distinct, got {chosen}")
    return sorted(chosen)


def _check_rank(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _check_rank_schedule(schedule: Mapping[int, int] | None) -> dict[int, int]:
    if schedule is None:
        return {}
    if not isinstance(schedule, Mapping):
        raise TypeError(f"rank_schedule must map experience indices to ranks, got {schedule!r}")
    for experience, rank in schedule.items():
        if isinstance(experience, bool) or not isinstance(experience, int) or experience < 1:
            raise ValueError(
                f"rank_schedule keys must be experience indices (ints >= 1), got {experience!r}"
            )
        _check_rank(f"rank_schedule[{experience}]", rank)
    if list(schedule) != sorted(schedule):
        raise ValueError(f"rank_schedule keys must be increasing, got {list(schedule)}")
    return dict(schedule)


class SDLoRAViT(DynamicModule, BaseModel):
    """A frozen timm ViT with SD-LoRA adapters on its fused ``qkv`` and a growing linear head.

    Args:
        backbone: a timm ``VisionTransformer`` (or any model with the same ``blocks[i].attn.qkv``
            layout). It is frozen and modified in place: its classifier is removed and every chosen
            ``attn.qkv`` becomes a :class:`~avalanche_sdlora.adapters.LoRAQKV`.
        rank: rank r of the adapters (before the first entry of ``rank_schedule``).
        rank_schedule: SD-LoRA-RR's smaller ranks for later adapters: ``{4: 8, 8: 6}`` gives the
            adapters of experiences 4-7 (0-based) rank 8 and those from experience 8 on rank 6.
        targets: the slices of ``qkv`` that get adapters, letters from ``"qkv"``.
        blocks: indices of the blocks that get adapters; ``None`` for all.
        adapters: ``False`` adds no adapter when an experience starts, so only the head trains: the
            head-only control of every study.
        gate: ``True`` for the Gumbel-Sparsemax gate; ``False`` is plain SD-LoRA (every beta 1).
        init_logit, alpha_init, tau_final: see :class:`~avalanche_sdlora.gate.GumbelGate`.
        initial_classes: size of the head before the first experience.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        rank: int = 10,
        rank_schedule: Mapping[int, int] | None = None,
        targets: str = "qv",
        blocks: Iterable[int] | None = None,
        adapters: bool = True,
        gate: bool = True,
        init_logit: float = 0.0,
        alpha_init: float = 1.0,
        tau_final: float = 0.5,
        initial_classes: int = 2,
    ):
        _check_backbone(backbone)
        _check_rank("rank", rank)
        rank_schedule = _check_rank_schedule(rank_schedule)
        targets = _check_targets(targets)
        adapted_blocks = _check_blocks(blocks, len(list(backbone.blocks.children())))
        super().__init__()
        backbone.requires_grad_(False)
        if hasattr(backbone, "reset_classifier"):
            backbone.reset_classifier(0)
        block_list = list(backbone.blocks.children())
        for index in adapted_blocks:
            attn = block_list[index].attn
            attn.qkv = LoRAQKV(attn.qkv, rank, targets)
        self.backbone = backbone
        self.rank = rank
        self.rank_schedule = rank_schedule
        self.targets = "".join(letter for letter in QKV_LETTERS if letter in targets)
        self.adapted_blocks = adapted_blocks
        self.adds_adapters = bool(adapters)
        self.gate_enabled = bool(gate)
        self.gate = GumbelGate(init_logit=init_logit, alpha_init=alpha_init, tau_final=tau_final)
        self.head = IncrementalClassifier(
            backbone.num_features, initial_out_features=initial_classes, auto_adapt=False
        )
        self.register_buffer("consolidated", torch.zeros(0, dtype=torch.bool))
        self.generator: torch.Generator | None = None
        """Source of the Gumbel noise; ``None`` uses torch's global generator (checkpointed)."""
        self.last_beta: Tensor | None = None
        """The beta of the last training forward, with its graph (for the sparsity regulariser)."""
        self.features: Tensor | None = None
        """The head's input of the last forward."""
        self._merged_from: tuple[tuple, list[Tensor]] | None = None
        self._adapted_experience: int | None = None
        self.register_load_state_dict_post_hook(SDLoRAViT._sync_trainable_after_load)
        self.to(next(backbone.parameters()).device)

    # ----------------------------------------------------------------- structure

    @property
    def qkv_modules(self) -> list[LoRAQKV]:
        """The adapted ``qkv`` layers, in block order."""
        return [m for m in self.backbone.modules() if isinstance(m, LoRAQKV)]

    @property
    def num_adapters(self) -> int:
        """Adapters ever added, pruned ones included."""
        return self.gate.num_adapters

    @property
    def num_active_adapters(self) -> int:
        """Adapters used by the forward pass (not pruned)."""
        return len(self.gate.active_indices)

    @property
    def pending_adapters(self) -> list[int]:
        """Active adapters not yet consolidated: the one being trained, if any."""
        return [i for i in self.gate.active_indices if not self.consolidated[i]]

    def rank_for(self, experience: int) -> int:
        """The rank of the adapter added for ``experience`` (0-based), by ``rank_schedule``."""
        reached = [rank for start, rank in self.rank_schedule.items() if start <= experience]
        return reached[-1] if reached else self.rank

    def adaptation(self, experience: CLExperience) -> None:
        """Avalanche's hook: one new adapter per training experience (none without ``adapters``);
        the head grows to its classes.

        A plugin that adapts the model again within the same experience (GDumb does) adds nothing;
        experiences are told apart by ``current_experience`` (without one, every call adds). The
        adapter's rank follows ``rank_schedule`` by that index (without one, by the adapter count).
        """
        key = getattr(experience, "current_experience", None)
        new_experience = key is None or key != self._adapted_experience
        if self.adds_adapters and self.training and new_experience:
            self.add_adapter(None if key is None else self.rank_for(key))
            self._adapted_experience = key
        self.head.adaptation(experience)

    def add_adapter(self, rank: int | None = None) -> int:
        """Consolidate any adapter still in training, then add a new one (B = 0: output unchanged).

        ``rank`` defaults to ``rank_for(num_adapters)``.
        """
        self.consolidate()
        return self._grow_adapter(self.rank_for(self.num_adapters) if rank is None else rank)

    def _grow_adapter(self, rank: int) -> int:
        _check_rank("rank", rank)
        for module in self.qkv_modules:
            module.add_adapter(rank)
        self.consolidated = torch.cat([self.consolidated, self.consolidated.new_zeros(1)])
        self._drop_merge()
        return self.gate.add_adapter()

    def set_adapter_trainable(self, index: int, trainable: bool) -> None:
        """Train (or freeze) the ``A`` and ``B`` of one adapter; only an active, unconsolidated one trains."""
        (index,) = self.gate.check_indices([index], allow_pruned=not trainable)
        if trainable and self.consolidated[index]:
            raise ValueError(f"adapter {index} is consolidated (frozen); it cannot train again")
        for module in self.qkv_modules:
            module.set_adapter_trainable(index, trainable)

    @torch.no_grad()
    def adapter_norms(self, index: int) -> Tensor:
        """``||B^p A^p||_F`` of one adapter for every adapted projection p (all blocks, q/k/v)."""
        norms = [direction_norms(*module.stacked([index])).flatten() for module in self.qkv_modules]
        return torch.cat(norms)

    @torch.no_grad()
    def consolidate(self) -> list[int]:
        """Freeze and normalise every active adapter still in training; return their indices.

        The direction becomes ``B A / ||B A||_F`` and alpha becomes ``alpha * mean_p ||B^p A^p||_F``,
        the least-squares magnitude: the output is kept exactly when every projection's norm is equal.
        """
        pending = self.pending_adapters
        for index in pending:
            self.gate.alphas[index].mul_(self.adapter_norms(index).mean())
            self.set_adapter_trainable(index, False)
        if pending:
            consolidated = self.consolidated.clone()
            consolidated[pending] = True
            self.consolidated = consolidated
            self._drop_merge()
        return pending

    def prune(self, indices: Iterable[int]) -> None:
        """Remove adapters from the gate and the forward pass for good (at least one stays)."""
        indices = list(indices)
        self.gate.prune(indices)
        for index in indices:
            for module in self.qkv_modules:
                module.set_adapter_trainable(index, False)
        self._drop_merge()

    @contextmanager
    def adapters_left_out(self, indices: Iterable[int]) -> Iterator[None]:
        """Within the block, the forward pass runs as if ``indices`` were pruned (the others' betas
        renormalised, as a pruning would leave them); nothing is frozen or changed for good. The
        growth decision measures the network without the new adapter this way."""
        indices = self.gate.check_indices(indices)
        saved = self.gate.pruned
        left_out = saved.clone()
        left_out[indices] = True
        if indices and left_out.all():
            raise ValueError(f"leaving out {indices} would leave no active adapter")
        self.gate.pruned = left_out
        try:
            yield
        finally:
            self.gate.pruned = saved

    @torch.no_grad()
    def adapter_summary(self) -> list[dict[str, float | int | bool]]:
        """Every adapter's rank, alpha, evaluation beta (1 with the gate off), pruned flag and
        number of absorbed projections."""
        gate, beta = self.gate, self.beta(noise=False)
        modules = self.qkv_modules
        absorbed = sum(module.absorbed.sum(dim=1) for module in modules).tolist()
        return [
            {
                "adapter": i,
                "rank": modules[0].adapter_rank(i),
                "alpha": gate.alphas[i].item(),
                "beta": beta[i].item(),
                "pruned": pruned,
                "absorbed_projections": absorbed[i],
            }
            for i, pruned in enumerate(gate.pruned.tolist())
        ]

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        """The parameters in the order they were created: backbone and head, then adapter by adapter
        (its A and B in every block, its logit and alpha).

        Module order would put a new adapter's tensors in the middle; this order puts them at the
        end, as plugins that pair parameters by position across experiences expect (online EWC).
        """
        adapter_of = {
            id(param): index
            for params in (
                self.gate.logits,
                self.gate.alphas,
                *(m.lora_A for m in self.qkv_modules),
                *(m.lora_B for m in self.qkv_modules),
            )
            for index, param in enumerate(params)
        }
        named = super().named_parameters(prefix, recurse, remove_duplicate)
        return iter(sorted(named, key=lambda item: adapter_of.get(id(item[1]), -1)))

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The parameters that currently require grad, by role: adapters, alphas, logits, head."""
        active = self.gate.active_indices
        adapters = [
            param
            for module in self.qkv_modules
            for i in active
            for param in (module.lora_A[i], module.lora_B[i])
        ]
        groups = {
            "adapters": adapters,
            "alphas": [self.gate.alphas[i] for i in active],
            "logits": [self.gate.logits[i] for i in active],
            "head": list(self.head.parameters()),
        }
        return {role: [p for p in params if p.requires_grad] for role, params in groups.items()}

    def trainable_parameter_count(self) -> int:
        """Parameters the method adds to the frozen backbone and still uses.

        ``A`` and ``B`` of every active adapter's slices, each at its own rank (absorbed slices are
        gone), the non-zero magnitude corrections of absorption, the adapters' alphas (and gate
        logits when the gate is on) and the head rows of the classes trained so far; pruned
        adapters, and head rows that an evaluation on future classes grew, are not counted.
        """
        active = self.gate.active_indices
        adapters = 0
        for module in self.qkv_modules:
            kept = (~module.absorbed[active]).sum(dim=1).tolist()
            ranks = [module.adapter_rank(i) for i in active]
            width = module.in_features + module.slice_features
            adapters += sum(k * r * width for k, r in zip(kept, ranks, strict=True))
            adapters += int((module.corrections[active] != 0).sum())
        scalars = 2 if self.gate_enabled else 1
        classifier = self.head.classifier
        seen_classes = int(self.head.active_units.sum())
        head = seen_classes * (classifier.in_features + int(classifier.bias is not None))
        return adapters + len(active) * scalars + head

    # ---------------------------------------------------------------- absorption

    @torch.no_grad()
    def direction_fits(self, index: int, experience: int | None = None) -> list[DirectionFit]:
        """SD-LoRA-KD's fit of adapter ``index``'s direction on the other active adapters', for
        every adapted projection where it still acts (``docs/METHOD.md``); nothing changes.

        ``absorbed`` is left ``False``; :meth:`absorb` decides. ``experience`` labels the rows
        (default: ``index``).
        """
        self._check_absorbable(index)
        others = [i for i in self.gate.active_indices if i != index]
        fits = []
        for block, module in zip(self.adapted_blocks, self.qkv_modules, strict=True):
            gram = module.gram([*others, index])  # the fitted adapter last
            for p, letter in enumerate(module.targets):
                kept = [k for k, i in enumerate(others) if not module.absorbed[i, p]]
                if not kept or module.absorbed[index, p]:
                    continue
                rows = torch.tensor([*kept, len(others)])
                coefficients, residual = fit_direction(gram[p][rows][:, rows])
                old = [others[k] for k in kept]
                fits.append(
                    DirectionFit(
                        experience=index if experience is None else experience,
                        adapter=index,
                        block=block,
                        projection=letter,
                        residual=residual,
                        coefficients=dict(zip(old, coefficients.tolist(), strict=True)),
                        absorbed=False,
                    )
                )
        return fits

    @torch.no_grad()
    def absorb(self, index: int, threshold: float) -> list[tuple[int, str]]:
        """Absorb adapter ``index`` on every projection whose fit residual is below ``threshold``.

        There the adapter's contribution ``a_t D_t^p`` (``a_t``: its alpha plus its correction on p)
        becomes ``sum_i a_t c_i D_i^p``: the old adapters' corrections on p grow by ``a_t c_i`` and
        the slice leaves the forward pass. An adapter absorbed everywhere is pruned. Returns the
        absorbed ``(block, projection)`` pairs.
        """
        if not threshold > 0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        absorbed = []
        modules = dict(zip(self.adapted_blocks, self.qkv_modules, strict=True))
        for fit in self.direction_fits(index):
            if fit.residual >= threshold:
                continue
            module = modules[fit.block]
            p = module.targets.index(fit.projection)
            magnitude = self.gate.alphas[index].item() + module.corrections[index, p].item()
            for old, coefficient in fit.coefficients.items():
                module.corrections[old, p] += magnitude * coefficient
            module.absorbed[index, p] = True
            absorbed.append((fit.block, fit.projection))
        if all(bool(module.absorbed[index].all()) for module in self.qkv_modules):
            self.prune([index])
        self._drop_merge()
        return absorbed

    def _check_absorbable(self, index: int) -> None:
        (index,) = self.gate.check_indices([index], allow_pruned=False)
        if self.gate_enabled:
            raise ValueError(
                "absorption (SD-LoRA-KD) is defined for plain SD-LoRA: build the model with "
                "gate=False (with the gate on, beta would scale the absorbed contribution)"
            )
        if not self.consolidated[index]:
            raise ValueError(f"adapter {index} is still training; consolidate it before absorbing")

    # ------------------------------------------------------------------- forward

    def beta(self, noise: bool) -> Tensor:
        """The gate's ``beta`` (with one Gumbel sample if ``noise``); all ones with the gate off."""
        if not self.gate_enabled:
            return (~self.gate.pruned).to(torch.float32)
        return self.gate.beta(noise, self.generator)

    def _adapter_terms(self, noise: bool) -> tuple[list[int], Tensor, Tensor]:
        """The active adapters, their ``beta_i * alpha_i`` (with one Gumbel sample if ``noise``) and
        which of them are consolidated (their directions normalised)."""
        active = self.gate.active_indices
        normalised = self.consolidated[active]
        if not active:
            return active, self.gate.pruned.new_zeros(0, dtype=torch.float32), normalised
        beta = self.beta(noise=noise)
        if noise:
            self.last_beta = beta
        return active, beta[active] * self.gate.alpha_vector()[active], normalised

    def _configure_adapters(self) -> None:
        """Hand each ``qkv`` its adapters for this forward, or the cached merge in evaluation."""
        merging = not self.training and not torch.is_grad_enabled()
        if merging and self._merge_is_current():
            return
        self._drop_merge()
        # A training step (training mode, autograd recording) draws its Gumbel sample; anything else,
        # such as a frozen copy run under ``no_grad`` (LwF's teacher), sees the deterministic gate.
        noise = self.training and torch.is_grad_enabled()
        active, coefficients, normalised = self._adapter_terms(noise)
        for module in self.qkv_modules:
            module.active, module.coefficients, module.normalised = active, coefficients, normalised
            if merging:  # detached: a plain tensor attribute, never a registered Parameter
                weight = module.effective_weight(active, coefficients, normalised)
                module.merged_weight = weight.detach()
        if merging:
            self._merged_from = self._merge_settings(), [t.clone() for t in self._merge_inputs()]

    def _merge_settings(self) -> tuple:
        return self.gate_enabled, self.gate.tau_final

    def _merge_inputs(self) -> list[Tensor]:
        """Every tensor the merged weights depend on."""
        tensors = [*self.gate.parameters(), self.gate.pruned, self.consolidated]
        for module in self.qkv_modules:
            tensors.extend((*module.lora_A, *module.lora_B, module.corrections, module.absorbed))
        return [t.detach() for t in tensors]

    def _merge_is_current(self) -> bool:
        """Whether every value the merge was built from is unchanged.

        Values are compared exactly with copies taken at the merge, so any change, an in-place
        ``.data`` edit included (which no version counter sees), drops the merge.
        """
        if self._merged_from is None:
            return False
        settings, copies = self._merged_from
        inputs = self._merge_inputs()
        return (
            settings == self._merge_settings()
            and len(inputs) == len(copies)
            and all(torch.equal(a, b) for a, b in zip(inputs, copies, strict=True))
        )

    def _drop_merge(self) -> None:
        self._merged_from = None
        for module in self.qkv_modules:
            module.merged_weight = None

    def train(self, mode: bool = True) -> SDLoRAViT:
        self._drop_merge()
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):
        self._drop_merge()
        return super()._apply(fn, recurse)

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled backbone features (the head's input) with the adapters applied."""
        self._configure_adapters()
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)

    def get_features(self, x: Tensor) -> Tensor:
        """Avalanche's feature accessor (``BaseModel.get_features``, used by LFL): the head's input."""
        return self.forward_features(x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits over the classes seen so far; the head's input stays in ``self.features`` (the
        attribute Avalanche's ``FeatureDistillationPlugin`` reads)."""
        self.features = self.forward_features(x)
        return self.head(self.features)

    # --------------------------------------------------------------- persistence

    def save_adapters(self, path: str | os.PathLike) -> None:
        """Write what the method learned, not the frozen backbone, to one safetensors file.

        It holds every adapter (A and B at its own rank), the corrections and absorbed flags of
        absorption, the gate, the ``consolidated`` flags and the head, with the metadata that
        :meth:`load_adapters` needs (format: :mod:`avalanche_sdlora.adapter_files`).
        """
        adapter_files.save_adapters(self, path)

    def load_adapters(self, path: str | os.PathLike) -> None:
        """Restore a :meth:`save_adapters` file into this model, built on the same backbone with the
        same targets and blocks (any rank): it then computes what the saved model computed.

        The saved settings (``rank``, ``rank_schedule``, gate on/off, ``tau_final``, the training
        temperature, ``adds_adapters``) replace the model's. Raises ``ValueError`` for a file that is
        not an adapter file or does not fit the model.
        """
        adapter_files.load_adapters(self, path)

    def merge_and_unload(self) -> nn.Module:
        """A plain copy of the backbone (a timm ``VisionTransformer``) that computes this model's
        evaluation output without any adapter module; the model itself is left unchanged.

        Every adapted ``attn.qkv`` becomes an ``nn.Linear`` holding the merged weight of evaluation
        (deterministic gate ``sparsemax(l / tau_final)``, consolidated directions normalised), and
        ``head`` an ``nn.Linear`` (``num_classes`` set to match) over the head's units up to the last
        trained class, so output j is still class j. There it equals the model's output; a unit in
        that range never trained outputs the head's mask value (-1000), as in the model; the units
        past the last trained class (grown by an evaluation on future classes) are dropped. Its
        parameters are frozen, like the backbone's. Raises ``ValueError`` before any class trained.
        """
        return adapter_files.merge_and_unload(self)

    def __getstate__(self) -> dict:
        """Drop the per-forward state: ``last_beta`` holds a graph; the merge is rebuilt on demand."""
        state = self.__dict__.copy()
        state.update(last_beta=None, _merged_from=None, features=None)
        return state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """Grow adapters (each at its saved rank) and head to the saved sizes, so a fresh model
        loads any checkpoint."""
        logit_prefix = f"{prefix}gate.logits."
        saved = sum(1 for key in state_dict if key.startswith(logit_prefix))
        first_qkv = next(n for n, m in self.named_modules() if isinstance(m, LoRAQKV))
        while self.num_adapters < saved:
            a = state_dict[f"{prefix}{first_qkv}.lora_A.{self.num_adapters}"]
            self._grow_adapter(a.shape[1])
        head_weight = state_dict.get(f"{prefix}head.classifier.weight")
        if head_weight is not None and head_weight.shape[0] != self.head.classifier.out_features:
            old = self.head.classifier
            self.head.classifier = nn.Linear(old.in_features, head_weight.shape[0]).to(
                old.weight.device
            )
            self.head.active_units = old.weight.new_zeros(head_weight.shape[0], dtype=torch.int8)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @staticmethod
    def _sync_trainable_after_load(module: SDLoRAViT, incompatible_keys) -> None:
        """Freeze what the loaded flags say is frozen: consolidated adapters and pruned ones.

        Nothing is unfrozen, so loading mid-phase (early stopping does) keeps the phase's settings.
        """
        module._drop_merge()
        pruned = module.gate.pruned.tolist()
        for index, (gone, done) in enumerate(
            zip(pruned, module.consolidated.tolist(), strict=True)
        ):
            if gone or done:
                for qkv in module.qkv_modules:
                    qkv.set_adapter_trainable(index, False)
            if gone:
                module.gate.alphas[index].requires_grad_(False)
                module.gate.logits[index].requires_grad_(False)
