"""Targets of `rtm-mapping bench`: a limit with its unit, and a measured value judged against it.

Each part keeps the limits of what it measures (its TARGETS); ratios are printed and recorded in the
JSON, never asserted by a test, since the machines that run tests are shared and noisy.
"""

import dataclasses
from typing import Optional, Tuple

# How a value and its limit are written: an overhead t / t0 - 1 in percent, a ratio, a count.
UNITS = ('overhead', 'ratio', 'count')


@dataclasses.dataclass(frozen=True)
class Limit:
    """At most `value`, in `unit` (one of UNITS)."""
    value:  float
    unit:   str

    def __post_init__(self):
        if self.unit not in UNITS:
            raise ValueError(f'unit must be one of {UNITS}, got {self.unit!r}')

    def judge(self, name: str, value: float, at_settings: bool = True) -> dict:
        """The target as the bench JSON records it; `met` is None where the value was not measured at the
        target's own settings (no checkout, --quick, shrunk channels or batch, another H)."""
        return dict(name=name, value=value, limit=self.value, unit=self.unit, met=(value <= self.value) if at_settings else None)


def formatted(target: dict) -> Tuple[str, str]:
    """(value, limit) of a recorded target as the report writes them."""
    unit, value, limit = target['unit'], target['value'], target['limit']
    if unit == 'overhead':
        return f'{value:+.2%}', f'{limit:.0%}'
    if unit == 'count':
        return f'{value:,}', f'{limit:,}'
    return f'{value:.2f}x', f'{limit:.2f}x'


def verdict(met: Optional[bool]) -> str:
    return 'not at target settings' if met is None else ('yes' if met else 'NO')
