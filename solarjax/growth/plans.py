"""Layer plans for depth up-scaling (DUS): which source layers a grown decoder stacks, in order.

A *layer plan* is a tuple of half-open source ranges, each with an optional scale, exactly as
mergekit's passthrough merge reads ``layer_range`` lists: SOLAR 10.7B is ``[(0, 24), (8, 32)]``
applied to Mistral 7B. Every depth-growth operator researchers compare (SOLAR, seam ablations,
plain repetition / G_stack, middle duplication, LLaMA Pro) is a plan; :mod:`solarjax.growth.dus`
applies one to params or to an HF checkpoint on disk.
"""


from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, ClassVar, Iterable, NamedTuple, Sequence

import numpy as np


class PlanError(ValueError):
    """A layer plan that cannot be applied; the message says which part and why."""


class Slice(NamedTuple):
    """Source layers ``[start, end)``; ``scale`` (if set) multiplies their wo and w_down."""

    start: int
    end: int
    scale: float | None = None


Plan = tuple[Slice, ...]


# ----------------------------------------------------------------------------- plans

def make_plan(ranges: Iterable[Sequence[Any]] | str, n_layers: int) -> Plan:
    """Validate ``ranges`` (``(start, end)`` or ``(start, end, scale)`` items, or a spec string)
    against a source with ``n_layers`` layers and return them as a :data:`Plan`."""
    if isinstance(ranges, str):
        return parse_plan_spec(ranges, n_layers)
    if not _is_int(n_layers) or n_layers <= 0:
        raise PlanError(f"the source model must have a positive number of layers, got {n_layers!r}")
    plan = []
    for i, item in enumerate(ranges):
        try:
            piece = Slice(*item)
        except TypeError as err:
            raise PlanError(f"plan slice {i} is {item!r}; expected (start, end) or (start, end, scale)") from err
        start, end, scale = piece
        if not (_is_int(start) and _is_int(end)):
            raise PlanError(f"plan slice {i} {item!r}: start and end must be integers")
        if not 0 <= start < end <= n_layers:
            raise PlanError(
                f"plan slice {i} [{start}, {end}) is out of range: need 0 <= start < end <= {n_layers} "
                f"(the source has {n_layers} layers; ranges are half-open)"
            )
        if scale is not None:
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
                raise PlanError(f"plan slice {i} [{start}, {end}): scale must be a finite number, got {scale!r}")
            scale = float(scale)
        plan.append(Slice(int(start), int(end), scale))
    if not plan:
        raise PlanError("the layer plan is empty: it must keep at least one source range")
    return tuple(plan)


def plan_layers(plan: Plan) -> list[int]:
    """The source layer of every output layer, in order."""
    return [i for s in plan for i in range(s.start, s.end)]


def plan_scales(plan: Plan) -> list[float | None]:
    """The scale (or None) of every output layer, in order."""
    return [s.scale for s in plan for _ in range(s.start, s.end)]


def format_plan(plan: Plan) -> str:
    """The plan as an explicit spec string (``"0:24,8:32"``) that :func:`parse_plan_spec` reads back."""
    return ",".join(f"{s.start}:{s.end}" + ("" if s.scale is None else f"*{s.scale:g}") for s in plan)


def solar(n: int, m: int) -> Plan:
    """SOLAR DUS: layers ``[0, n-m)`` of one copy, then ``[m, n)`` of another (2(n-m) layers).

    ``m = 0`` is plain repetition, the paper's contrasting baseline.
    """
    _check_count("n", n, 1)
    if not _is_int(m) or m < 0:
        raise PlanError(f"solar: m={m!r} must be a non-negative integer (layers dropped at the seam)")
    if m >= n:
        raise PlanError(f"solar: m={m} must be smaller than n={n}, or a copy would keep no layers")
    return make_plan([(0, n - m), (m, n)], n)


def check_deeper(plan: Plan, n_layers: int, spec: str) -> None:
    """Refuse a plan whose model is no deeper than its ``n_layers``-layer source: depth up-scaling
    that shrinks is almost always a wrong ``m`` (SOLAR keeps ``2(n - m)`` layers, so it deepens only
    while ``m < n/2``: ``solar:m=16`` on 30 layers writes 28). Callers skip this on request
    (``upscale --allow-shallower``, ``init.allow_shallower``) for a deliberate prune."""
    n_out = len(plan_layers(plan))
    if n_out > n_layers:
        return
    hint = ""
    if spec.replace(" ", "").lower().startswith("solar:"):
        hint = f"; SOLAR's m must be below n/2 to deepen (m <= {(n_layers - 1) // 2} for {n_layers} layers, paper: 8)"
    raise PlanError(f"plan {spec!r} makes {n_out} layers from {n_layers}: no deeper than the source{hint}. To write "
                    "it anyway: --allow-shallower (upscale) or --config.init.allow_shallower=true (training verbs)")


def seam(n: int, first_end: int, second_start: int) -> Plan:
    """Two copies cut anywhere: ``[0, first_end)`` then ``[second_start, n)`` (seam ablations)."""
    return make_plan([(0, first_end), (second_start, n)], n)


def repeat(n: int, k: int) -> Plan:
    """The whole stack ``k`` times (G_stack-style growth); ``repeat(n, 2) == solar(n, 0)``."""
    _check_count("repeat: k", k, 1)
    return make_plan([(0, n)] * k, n)


def middle(n: int, start: int, end: int) -> Plan:
    """Duplicate the block ``[start, end)`` in place (Yi-9B style): ``[0, end)`` then ``[start, n)``."""
    if not (_is_int(start) and _is_int(end)) or not 0 <= start < end <= n:
        raise PlanError(f"middle: need 0 <= start < end <= n={n} for the duplicated block, got [{start}, {end})")
    return make_plan([(0, end), (start, n)], n)


def interleave(n: int, start: int = 0, end: int | None = None, k: int = 2) -> Plan:
    """Repeat every layer of ``[start, end)`` ``k`` times in place (layer-wise duplication)."""
    end = n if end is None else end
    _check_count("interleave: k", k, 1)
    if not (_is_int(start) and _is_int(end)) or not 0 <= start < end <= n:
        raise PlanError(f"interleave: need 0 <= start < end <= n={n}, got [{start}, {end})")
    ranges = [(0, start)] if start else []
    ranges += [(i, i + 1) for i in range(start, end) for _ in range(k)]
    ranges += [(end, n)] if end < n else []
    return make_plan(ranges, n)


def llama_pro(n: int, n_new: int) -> Plan:
    """LLaMA Pro block expansion: after every ``n / n_new`` layers insert a copy of the preceding
    layer with zero output projections (scale 0), so the grown model computes the same function."""
    _check_count("llama_pro: n_new", n_new, 1)
    if n_new > n or n % n_new:
        raise PlanError(
            f"llama_pro: n_new={n_new} must divide n={n} (one identity block after every n/n_new layers)"
        )
    group = n // n_new
    ranges: list[tuple] = []
    for g in range(n_new):
        ranges += [(g * group, (g + 1) * group), ((g + 1) * group - 1, (g + 1) * group, 0.0)]
    return make_plan(ranges, n)


# ----------------------------------------------------------------------------- typed plan steps
# Each operator's arguments are one small record, registered once in OPERATORS: its spec string
# (``spec()``, what ``init.upscale`` and ``upscale --plan`` take) and its plan (``plan(n)``) both come
# from the record, so studies build steps as records instead of formatting strings.


@dataclasses.dataclass(frozen=True)
class PlanStep:
    """One operator's arguments; ``NAME`` is the spec's head, the fields are its ``key=INT`` arguments."""

    NAME: ClassVar[str] = ""

    def plan(self, n: int) -> Plan:
        raise NotImplementedError

    def spec(self) -> str:
        args = ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                        if getattr(self, f.name) is not None)
        return f"{self.NAME}:{args}"


@dataclasses.dataclass(frozen=True)
class Solar(PlanStep):
    m: int
    NAME: ClassVar[str] = "solar"

    def plan(self, n: int) -> Plan:
        return solar(n, self.m)


@dataclasses.dataclass(frozen=True)
class Seam(PlanStep):
    first_end: int
    second_start: int
    NAME: ClassVar[str] = "seam"

    def plan(self, n: int) -> Plan:
        return seam(n, self.first_end, self.second_start)


@dataclasses.dataclass(frozen=True)
class Repeat(PlanStep):
    k: int
    NAME: ClassVar[str] = "repeat"

    def plan(self, n: int) -> Plan:
        return repeat(n, self.k)


@dataclasses.dataclass(frozen=True)
class Middle(PlanStep):
    start: int
    end: int
    NAME: ClassVar[str] = "middle"

    def plan(self, n: int) -> Plan:
        return middle(n, self.start, self.end)


@dataclasses.dataclass(frozen=True)
class Interleave(PlanStep):
    start: int | None = None  # None: from layer 0
    end: int | None = None  # None: to the top
    k: int = 2
    NAME: ClassVar[str] = "interleave"

    def plan(self, n: int) -> Plan:
        return interleave(n, 0 if self.start is None else self.start, self.end, self.k)


@dataclasses.dataclass(frozen=True)
class LlamaPro(PlanStep):
    new: int
    NAME: ClassVar[str] = "llama_pro"

    def plan(self, n: int) -> Plan:
        return llama_pro(n, self.new)


@dataclasses.dataclass(frozen=True)
class Ranges(PlanStep):
    """Explicit half-open ranges ``(start, end)`` or ``(start, end, scale)``: ``"0:24,8:32*0.5"``."""

    ranges: tuple[tuple, ...]

    def plan(self, n: int) -> Plan:
        return make_plan(self.ranges, n)

    def spec(self) -> str:
        return ",".join(f"{r[0]}:{r[1]}" + (f"*{r[2]:g}" if len(r) > 2 and r[2] is not None else "")
                        for r in self.ranges)


OPERATORS: dict[str, type[PlanStep]] = {cls.NAME: cls for cls in (Solar, Seam, Repeat, Middle, Interleave, LlamaPro)}


def parse_plan_spec(spec: str, n_layers: int) -> Plan:
    """Parse a plan string for a source with ``n_layers`` layers (:func:`parse_plan_step`'s forms)."""
    return parse_plan_step(spec).plan(n_layers)


def parse_plan_step(spec: str) -> PlanStep:
    """The typed record of a plan string.

    Forms (the trainer's ``init.upscale`` and ``solarjax upscale --plan`` take the same strings):

    - ``"solar:m=8"``: SOLAR DUS (``m=0`` repeats the stack twice);
    - ``"seam:first_end=24,second_start=8"``: any two cut points;
    - ``"repeat:k=2"``, ``"middle:start=8,end=24"``, ``"interleave:start=8,end=16,k=2"``;
    - ``"llama_pro:new=8"`` (or ``llama-pro``): LLaMA Pro identity blocks;
    - ``"0:24,8:32"``: explicit half-open ranges; ``"0:8,7:8*0"`` gives a range a scale.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise PlanError(f"empty layer plan spec {spec!r}; e.g. 'solar:m=8' or '0:24,8:32'")
    text = spec.strip().replace(" ", "")
    head, _, rest = text.partition(":")
    if head and head[0].isdigit():
        return Ranges(tuple(_parse_range(part, spec) for part in text.split(",")))
    name = head.replace("-", "_").lower()
    if name not in OPERATORS:
        raise PlanError(
            f"unknown plan method {head!r} in {spec!r}; known: {sorted(OPERATORS)} or ranges like '0:24,8:32'"
        )
    record = OPERATORS[name]
    keys = [f.name for f in dataclasses.fields(record)]
    kwargs = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in keys:
            raise PlanError(f"{spec!r}: bad argument {item!r}; {name} takes {', '.join(k + '=INT' for k in keys)}")
        try:
            kwargs[key] = int(value)
        except ValueError as err:
            raise PlanError(f"{spec!r}: {key}={value!r} is not an integer") from err
    try:
        return record(**kwargs)
    except TypeError as err:
        raise PlanError(f"{spec!r}: {name} needs {', '.join(k + '=INT' for k in keys)} ({err})") from err


def _parse_range(part: str, spec: str) -> tuple:
    match = re.fullmatch(r"(-?\d+):(-?\d+)(?:\*([^,]+))?", part)
    if not match:
        raise PlanError(f"{spec!r}: cannot read range {part!r}; write START:END or START:END*SCALE")
    start, end, scale = match.groups()
    try:
        return (int(start), int(end)) if scale is None else (int(start), int(end), float(scale))
    except ValueError as err:
        raise PlanError(f"{spec!r}: scale {scale!r} of range {part!r} is not a number") from err


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_count(name: str, value: Any, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        raise PlanError(f"{name}={value!r} must be an integer >= {minimum}")


# ----------------------------------------------------------------------------- in memory

