"""Fault injection for tests and chaos drills; inert unless `COGVIEW_RAY_FAULTS` is set.

The variable holds JSON: {"rules": [{"match": "POISON", "action": "raise", "times": 2}],
"state_dir": "/tmp/x"}. A rule fires for a batch (or shard) holding a prompt that contains
`match`. Actions: raise (an exception while rendering), exit (the worker process dies at once),
hang (sleeps far past any timeout), nan (the row's output is non-finite), oom (device out of
memory for batches larger than `batch_over`), slow (sleeps `seconds` before each batch).
`times` caps how often a rule fires across all processes (counted with files in state_dir).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

ENV = "COGVIEW_RAY_FAULTS"


@dataclass
class FaultPlan:
    rules: list = field(default_factory=list)
    state_dir: str = ""

    @classmethod
    def from_env(cls) -> "FaultPlan":
        raw = os.environ.get(ENV)
        if not raw:
            return cls()
        spec = json.loads(raw)
        return cls(spec.get("rules", []), spec.get("state_dir", ""))

    def _hits(self, rows) -> list[dict]:
        prompts = [r.prompt or "" for r in rows if r.status == "pending"]
        return [rule for rule in self.rules if any(rule.get("match", "") in p for p in prompts)]

    def _take(self, i: int, rule: dict) -> bool:
        """Consume one firing of a rule with a `times` cap (atomic across processes)."""
        times = rule.get("times")
        if times is None:
            return True
        for n in range(int(times)):
            token = Path(self.state_dir) / f"rule{i}-{n}"
            try:
                fd = os.open(token, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                continue
            os.close(fd)
            return True
        return False

    def before_shard(self, rows) -> None:
        self._fire(rows, scope="shard")

    def before_batch(self, rows) -> None:
        self._fire(rows, scope="batch")

    def _fire(self, rows, scope: str) -> None:
        for i, rule in enumerate(self.rules):
            if rule.get("scope", "batch") != scope or rule not in self._hits(rows):
                continue
            action = rule["action"]
            if action == "oom" and len(rows) <= int(rule.get("batch_over", 0)):
                continue
            if action in ("nan",) or not self._take(i, rule):
                continue
            if action == "raise":
                raise RuntimeError(f"injected fault: rendering crashed on a prompt matching {rule['match']!r}")
            if action == "exit":
                os._exit(137)
            if action == "hang":
                time.sleep(float(rule.get("seconds", 3600)))
            if action == "slow":
                time.sleep(float(rule.get("seconds", 1)))
            if action == "oom":
                import torch

                raise torch.cuda.OutOfMemoryError("injected fault: CUDA out of memory")

    def finite(self, rows, finite: list[bool]) -> list[bool]:
        """Mark rows matching a `nan` rule as non-finite output."""
        nan_matches = [r["match"] for r in self.rules if r["action"] == "nan"]
        return [ok and not any(m in (row.prompt or "") for m in nan_matches) for row, ok in zip(rows, finite)]
