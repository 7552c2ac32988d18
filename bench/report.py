"""The printing and the signal handling every benchmark entry point shares."""

from __future__ import annotations

from typing import Any


def table(results: dict[str, Any], indent: str = "") -> str:
    lines = []
    for phase, values in results.items():
        if phase == "matrix_table":
            lines.append(str(values))
        if phase == "machine" or not isinstance(values, dict):
            continue
        lines.append(f"{indent}{phase}:")
        nested = {k: v for k, v in values.items() if isinstance(v, dict)}
        lines.extend(f"{indent}  {k:<32} {v}" for k, v in values.items() if not isinstance(v, dict))
        if nested:
            lines.append(table(nested, indent + "  "))
    return "\n".join(lines)


def interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through every finally: cleanup
