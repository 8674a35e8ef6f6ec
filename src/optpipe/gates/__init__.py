"""Gates: compare a runnable artifact with the unoptimized reference; a gate only sees runners."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GateResult:
    name: str
    passed: bool | None  # None: not measured
    metrics: dict
    thresholds: dict
    failures: list[str] = field(default_factory=list)
    inconclusive: bool = False  # refused because the measurement could not decide (not because it failed)

    def to_json(self) -> dict:
        status = ("not measured" if self.passed is None else "passed" if self.passed else
                  "inconclusive" if self.inconclusive else "failed")
        return {"status": status, "passed": self.passed, **self.metrics, "thresholds": self.thresholds,
                "failures": self.failures}

    @classmethod
    def from_json(cls, name: str, record: dict) -> GateResult:
        """Back from `to_json` (tune keeps gate results in its cache)."""
        rest = {k: v for k, v in record.items() if k not in ("status", "passed", "thresholds", "failures")}
        return cls(name, record["passed"], rest, record["thresholds"], list(record["failures"]),
                   record["status"] == "inconclusive")
