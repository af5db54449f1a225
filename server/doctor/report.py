"""Doctor results: one Check per question, printed as a table or JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TextIO

Status = Literal["ok", "fail", "skip"]


@dataclass
class Check:
    name: str
    status: Status
    summary: str  # one line: what was found, or for a failure what is wrong and the fix
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.status == "fail"


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)

    def add(self, check: Check) -> Check:
        self.checks.append(check)
        return check

    @property
    def ok(self) -> bool:
        return not any(c.failed for c in self.checks)

    @property
    def problems(self) -> list[str]:
        """One line per problem: `name: reason`."""
        return [f"{c.name}: {c.summary}" for c in self.checks if c.failed]

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": self.problems,
                "checks": [asdict(c) for c in self.checks]}

    def write_json(self, out: TextIO) -> None:
        json.dump(self.as_dict(), out, indent=2, default=str)
        out.write("\n")

    def write_text(self, out: TextIO) -> None:
        width = max((len(c.name) for c in self.checks), default=0)
        for check in self.checks:
            out.write(f"{check.status.upper():<4}  {check.name:<{width}}  {check.summary}\n")
            for line in check.details.get("lines", []):
                out.write(f"{'':<4}  {'':<{width}}    {line}\n")
        out.write("all checks passed\n" if self.ok else
                  f"{len(self.problems)} problem(s)\n")
