"""Runs the command line on every rank of ``torchrun``, recording what each rank holds.

After every evaluation (one per experience) each rank writes a hash of its model's parameters and
buffers, and of its Gumbel trace, to ``--record DIR/rank<r>.jsonl``. ``--fail-rank R`` makes rank R
raise when it starts its second training experience (the other ranks must come down too).
Everything after ``--`` goes to ``avalanche_sdlora.runner.cli``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
from avalanche.training.templates import SupervisedTemplate

from avalanche_sdlora import distributed
from avalanche_sdlora.plugins import GateTracePlugin
from avalanche_sdlora.runner.cli import main


def fingerprint(strategy: SupervisedTemplate) -> dict[str, str]:
    state = hashlib.sha256()
    for name, value in strategy.model.state_dict().items():
        if isinstance(value, torch.Tensor):  # not the gate's extra state
            state.update(name.encode() + value.detach().cpu().contiguous().numpy().tobytes())
    trace = next((p.trace for p in strategy.plugins if isinstance(p, GateTracePlugin)), [])
    return {
        "model": state.hexdigest(),
        "gate_trace": hashlib.sha256(json.dumps(trace).encode()).hexdigest(),
    }


def record_after_every_eval(folder: Path) -> None:
    evaluate = SupervisedTemplate.eval

    def recorded(self, *args, **kwargs):
        result = evaluate(self, *args, **kwargs)
        with open(folder / f"rank{distributed.rank()}.jsonl", "a") as handle:
            handle.write(json.dumps({"strategy": type(self).__name__, **fingerprint(self)}) + "\n")
        return result

    SupervisedTemplate.eval = recorded


def fail_on_second_experience(rank: int) -> None:
    train, calls = SupervisedTemplate.train, []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2 and distributed.rank() == rank:
            raise RuntimeError(f"simulated failure on rank {rank}")
        return train(self, *args, **kwargs)

    SupervisedTemplate.train = failing


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--record", type=Path)
    parser.add_argument("--fail-rank", type=int)
    args, rest = parser.parse_known_args()
    if args.record is not None:
        args.record.mkdir(parents=True, exist_ok=True)
        record_after_every_eval(args.record)
    if args.fail_rank is not None:
        fail_on_second_experience(args.fail_rank)
    sys.exit(main(rest[1:] if rest[:1] == ["--"] else rest))
