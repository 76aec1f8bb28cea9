"""Fault injection for the crash tests, kept out of the library.

`python tests/crashing.py ARGS...` runs `loramix ARGS...` (under torchrun too) and, when LORAMIX_CRASH_AT
names a point, SIGKILLs the process there; `kill_at(monkeypatch, point, action)` does `action` there in
this process. Points:
  step-N                once step N is done (its evaluation and checkpoint included), before step N+1
  checkpoint-N-partial  while step N's checkpoint is written: after state.json, before checksums.json
  tokenize-N            while the token store is written: once its N-th chunk is encoded
"""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _patches(point: str, action) -> list[tuple[object, str, object]]:
    """(module, attribute, replacement) that run `action` at `point`."""
    from loramix import checkpoint, training
    from loramix.data import tokens

    step = re.fullmatch(r"step-(\d+)", point)
    partial = re.fullmatch(r"checkpoint-(\d+)-partial", point)
    if step:  # at the start of the next step, or of the final evaluation after the last one
        real_step, real_final, n = training._train_step, training.final_evaluation, int(step[1])

        def train_step(loop, *args, **kwargs):
            if loop.state.step == n:
                action()
            return real_step(loop, *args, **kwargs)

        def final_evaluation(loop, *args, **kwargs):
            if loop.state.step == n:
                action()
            return real_final(loop, *args, **kwargs)
        return [(training, "_train_step", train_step), (training, "final_evaluation", final_evaluation)]
    if partial:
        real_sha, name = checkpoint._sha256, f".step-{int(partial[1]):07d}."

        def sha256(path: Path):  # the checksums of a checkpoint being written, in its temporary dir
            if Path(path).parent.name.startswith(name):
                action()
            return real_sha(path)
        return [(checkpoint, "_sha256", sha256)]
    chunk = re.fullmatch(r"tokenize-(\d+)", point)
    if chunk:
        real_chunk, calls = tokens._encode_chunk, []

        def encode_chunk(*args, **kwargs):
            out = real_chunk(*args, **kwargs)
            calls.append(1)
            if len(calls) == int(chunk[1]):
                action()
            return out
        return [(tokens, "_encode_chunk", encode_chunk)]
    raise ValueError(f"unknown crash point {point!r}")


def kill_at(monkeypatch, point: str, action=_kill):
    """Run `action` at `point` in this process; returns a function that disarms it."""
    armed = [True]

    def act():
        if armed:
            action()
    for module, attribute, replacement in _patches(point, act):
        monkeypatch.setattr(module, attribute, replacement)
    return lambda: armed.clear()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    point = os.environ.get("LORAMIX_CRASH_AT")
    for module, attribute, replacement in _patches(point, _kill) if point else []:
        setattr(module, attribute, replacement)
    from loramix.cli import main

    sys.exit(main(sys.argv[1:]))
