"""Evidence: what one estimator saw, what it suggests, how sure it is and what it cost.

No estimator decides alone; `lorank.decide` weighs the Evidence objects they return.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Evidence:
    """One estimator's finding.

    `kind` says how `decide` may use it:
      - "ceiling": `suggested_rank` is an upper bound at full capacity (loose in practice);
      - "estimate": `suggested_rank` is a point estimate of the right rank, `interval` its range;
      - "curve": `curve` holds a rank -> loss curve with standard errors (probe, sweep).
    """

    name: str
    kind: str
    suggested_rank: int | None
    interval: tuple[int, int] | None = None
    per_rank: dict[int, str] = field(default_factory=dict)  # short text shown per candidate rank
    curve: dict[int, dict[str, float]] = field(default_factory=dict)  # rank -> {"loss", "se", ...}
    rank_pattern: dict[str, int] = field(default_factory=dict)
    assumptions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    cost_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["per_rank"] = {str(k): v for k, v in self.per_rank.items()}
        d["curve"] = {str(k): v for k, v in self.curve.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Evidence:
        """The Evidence `to_dict` wrote, also after a JSON round trip (rank keys back to int,
        the interval back to a tuple); `details` is taken as it is."""
        d = dict(d)
        d["per_rank"] = {int(k): v for k, v in (d.get("per_rank") or {}).items()}
        d["curve"] = {int(k): v for k, v in (d.get("curve") or {}).items()}
        d["interval"] = tuple(d["interval"]) if d.get("interval") is not None else None
        return cls(**d)
