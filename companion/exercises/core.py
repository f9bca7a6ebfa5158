"""The grader: an exercise registry, fresh test cases on every call, and ``check``.

An :class:`Exercise` knows its id (``"ch04.quantize_nf4"``), the signature the student writes, a
task and a hint, and how to draw test cases. Each :class:`Case` carries the inputs and the expected
value, which the chapter module computes with the reference implementation (bitsandbytes, PEFT,
torch, transformers) where one exists and with the companion otherwise.

:func:`check` calls the student's function on every case and stops at the first wrong answer. It
never raises for anything the student's function does: a wrong signature, an exception, a wrong
dtype or shape, a call into the library the exercise is graded against, or a
``NotImplementedError`` stub all become a :class:`CheckResult` whose ``message`` says what happened.
"""

from __future__ import annotations

import importlib
import inspect
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from .compare import compare_equal, compare_number, compare_tensor, compare_tuple, describe  # noqa: F401 (re-exported)

LEVELS = ("warm-up", "core", "stretch")
# What a CheckResult's ``status`` can be; only "passed" means passed.
STATUSES = ("passed", "failed", "not_implemented", "error", "bad_signature", "uses_reference")
_HERE = Path(__file__).resolve().parent


@dataclass
class Case:
    """One call of the student's function: ``fn(*args, **kwargs)`` should return ``expected``.

    ``compare(got, expected) -> str | None`` returns ``None`` when ``got`` is right and otherwise a
    sentence saying how it is wrong. ``inputs`` (optional) replaces ``args``/``kwargs`` in messages.
    ``note`` names what makes the case hard.
    """

    args: tuple
    expected: Any
    compare: Callable[[Any, Any], str | None]
    kwargs: dict = field(default_factory=dict)
    note: str = ""  # what makes this case hard ("exact tie on a threshold", "partial last block")
    inputs: str = ""  # a short description of the call for messages (a model or a config prints long)


@dataclass(frozen=True)
class Exercise:
    """One graded exercise. ``cases(rng)`` yields :class:`Case` objects drawn from ``rng`` (a
    ``random.Random``); ``forbidden`` names the packages (``"peft"``: all of it) or single modules
    (``"companion.select"``) whose code the student's function may not run: the library it is graded
    against."""

    id: str
    chapter: int
    title: str
    level: str
    signature: str
    task: str
    hint: str
    cases: Callable[[random.Random], Iterable[Case]]
    forbidden: tuple[str, ...] = ("bitsandbytes", "peft", "companion")

    @property
    def name(self) -> str:
        """The function name a submission defines: the part of the id after the chapter."""
        return self.id.split(".", 1)[1]

    def as_dict(self) -> dict:
        return {"id": self.id, "chapter": self.chapter, "title": self.title, "level": self.level,
                "signature": self.signature}


_REGISTRY: dict[str, Exercise] = {}


def register(exercise: Exercise) -> Exercise:
    """Add ``exercise`` to the registry (ids are unique; levels are :data:`LEVELS`)."""
    if exercise.level not in LEVELS:
        raise ValueError(f"{exercise.id}: level must be one of {LEVELS}, got {exercise.level!r}")
    if exercise.id in _REGISTRY:
        raise ValueError(f"exercise id {exercise.id!r} is registered twice")
    if not exercise.id.startswith(f"ch{exercise.chapter:02d}."):
        raise ValueError(f"{exercise.id}: the id must start with 'ch{exercise.chapter:02d}.'")
    _REGISTRY[exercise.id] = exercise
    return exercise


def _load_chapters() -> None:
    from . import ch01, ch02, ch03, ch04, ch05, ch06, ch07  # noqa: F401  (each registers its exercises)


def get_exercise(exercise_id: str) -> Exercise:
    """The registered exercise, or ``KeyError`` listing the valid ids."""
    _load_chapters()
    if exercise_id not in _REGISTRY:
        raise KeyError(f"unknown exercise id {exercise_id!r}; the valid ids are: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[exercise_id]


def list_exercises(chapter: int | None = None) -> list[dict]:
    """Every exercise (or those of ``chapter``, 1-7) as dicts with ``id``, ``chapter``, ``title``,
    ``level`` and ``signature``, in the order of the chapters and of their exercise notebooks."""
    _load_chapters()
    if chapter is not None and chapter not in range(1, 8):
        raise ValueError(f"chapter must be one of 1-7 (or None for all), got {chapter!r}")
    rows = [e.as_dict() for e in _REGISTRY.values() if chapter is None or e.chapter == chapter]
    return sorted(rows, key=lambda r: r["chapter"])  # within a chapter: the notebook's order (registration)


@dataclass
class CheckResult:
    """What :func:`check` found. ``passed`` is True only if every case was right; ``message`` gives the
    first failing case (inputs, expected, got, hint); ``cases`` counts the cases that matched before it (all
    of them when passed); ``seed`` redraws the same cases (``check(id, fn, seed=...)``)."""

    exercise_id: str
    passed: bool
    message: str
    cases: int
    status: str = "passed"
    seed: int | None = None
    seconds: float = 0.0

    def __str__(self) -> str:
        mark = "PASSED" if self.passed else self.status.upper().replace("_", " ")
        return f"[{mark}] {self.exercise_id}: {self.message}"

    def _repr_pretty_(self, printer, cycle):  # how a notebook shows it
        printer.text(str(self))

    def verify(self) -> "CheckResult":
        """Return ``self`` if passed. Otherwise raise: ``NotImplementedError`` for a stub that is not
        written yet (the student notebooks run with only that error), ``AssertionError(message)`` else."""
        if self.passed:
            return self
        if self.status == "not_implemented":
            raise NotImplementedError(self.message)
        raise AssertionError(str(self))


# ---------------------------------------------------------------------------------------------------------
# Catching a submission that calls the library it is graded against

def _package_dirs(names: Iterable[str]) -> dict[str, str]:
    """Path prefix per forbidden name: a package's folder, a plain module's file, or for ``"pkg.__init__"``
    only the package's ``__init__.py`` (``"torch.autograd.__init__"`` forbids ``torch.autograd.grad`` and
    ``Tensor.backward`` but not ``torch.no_grad``, which lives in ``grad_mode.py``)."""
    dirs = {}
    for name in names:
        if name.endswith(".__init__"):
            module = importlib.import_module(name.removesuffix(".__init__"))
            dirs[name.removesuffix(".__init__")] = str(Path(module.__file__).resolve())
            continue
        module = sys.modules.get(name)
        if module is None:
            try:
                module = __import__(name)
            except Exception:  # not installed: it cannot be called either
                continue
        path = getattr(module, "__file__", None)
        if path:  # a package: everything under its folder; a plain module: its one file
            path = Path(path).resolve()
            dirs[name] = str(path.parent) + os.sep if path.name == "__init__.py" else str(path)
    return dirs


class ReferenceCall(Exception):
    """Raised inside the student's function at its first call into a forbidden package."""

    def __init__(self, package: str, function: str):
        super().__init__(f"{package}: {function}")
        self.package, self.function = package, function


class _Guard:
    """``sys.setprofile`` hook: the first Python-level call into a forbidden package raises."""

    def __init__(self, forbidden: tuple[str, ...]):
        self.dirs = _package_dirs(forbidden)
        self.hit: ReferenceCall | None = None
        self._exercises_dir = str(_HERE) + os.sep

    def __call__(self, frame, event, arg):
        if event != "call" or self.hit is not None:
            return
        filename = frame.f_code.co_filename
        if filename.startswith(self._exercises_dir) and frame.f_code.co_name in ("__exit__",):
            return
        for package, directory in self.dirs.items():
            if filename.startswith(directory):
                module = frame.f_globals.get("__name__", package)
                self.hit = ReferenceCall(package, f"{module}.{frame.f_code.co_name}")
                raise self.hit

    def __enter__(self):
        self._previous = sys.getprofile()
        sys.setprofile(self)
        return self

    def __exit__(self, *exc):
        sys.setprofile(self._previous)
        return False


# ---------------------------------------------------------------------------------------------------------
# check()

def _signature_problem(exercise: Exercise, fn, case: Case) -> str | None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None  # builtins and C functions: let the call decide
    try:
        sig.bind(*case.args, **case.kwargs)
    except TypeError as err:
        return (f"wrong signature: the grader calls {exercise.signature}, but "
                f"{getattr(fn, '__name__', 'fn')}{sig} cannot take that call ({err})")
    return None


def _call_description(case: Case) -> str:
    if case.inputs:
        return f"fn({case.inputs})"
    parts = [describe(a) for a in case.args] + [f"{k}={describe(v)}" for k, v in case.kwargs.items()]
    return f"fn({', '.join(parts)})"


def _values(expected, got) -> str:
    """" Expected ..., got ..." for tensors and containers; nothing for a number or a string, whose
    comparison sentence already states both."""
    if isinstance(expected, (int, float, str, bool)) and isinstance(got, (int, float, str, bool)):
        return ""
    return f" Expected {describe(expected)}, got {describe(got)}."


def _reference_message(exercise: Exercise, hit: ReferenceCall) -> str:
    return (f"your function calls {hit.function} from {hit.package}, which this exercise is graded against; "
            f"compute it yourself (not allowed here: {', '.join(exercise.forbidden)})")


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def check(exercise_id: str, fn: Callable, *, seed: int | None = None) -> CheckResult:
    """Grade ``fn`` on exercise ``exercise_id`` and return a :class:`CheckResult`.

    Cases are drawn afresh on each call from ``seed`` (a new random seed when None, reported in the
    result so a failure can be replayed). The expected values come from the reference implementation
    named in the exercise. Errors of the caller (an unknown id, a ``fn`` that is not callable) raise
    ``KeyError``/``TypeError``; everything ``fn`` does is reported in the result instead.
    """
    exercise = get_exercise(exercise_id)
    if not callable(fn):
        raise TypeError(f"check({exercise_id!r}, fn): fn must be the function you wrote, got {type(fn).__name__}")
    seed = random.SystemRandom().randrange(2**31) if seed is None else int(seed)
    start = time.perf_counter()

    def result(passed: bool, status: str, message: str, n: int) -> CheckResult:
        return CheckResult(exercise_id, passed, message, n, status, seed, round(time.perf_counter() - start, 3))

    rng = random.Random(seed)
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(rng.randrange(2**31))
    try:
        cases = list(exercise.cases(rng))
    finally:
        torch.random.set_rng_state(torch_state)
    replay = f"(replay with check({exercise_id!r}, fn, seed={seed}))"
    for n, case in enumerate(cases, start=1):
        problem = _signature_problem(exercise, fn, case)
        if problem:
            return result(False, "bad_signature", problem, n - 1)
        args, kwargs = _clone(case.args), _clone(case.kwargs)
        guard = _Guard(exercise.forbidden)
        try:
            with guard:
                got = fn(*args, **kwargs)
        except NotImplementedError:
            return result(False, "not_implemented",
                          f"not implemented yet: replace the `raise NotImplementedError` in "
                          f"{getattr(fn, '__name__', 'fn')} with your code. Hint: {exercise.hint}", n - 1)
        except KeyboardInterrupt:
            raise
        except BaseException as err:  # SystemExit included: a submission may not end the grader
            if guard.hit is not None:
                return result(False, "uses_reference", _reference_message(exercise, guard.hit), n - 1)
            return result(False, "error",
                          f"case {n} of {len(cases)} raised {type(err).__name__}: {err}. The call was "
                          f"{_call_description(case)}{' [' + case.note + ']' if case.note else ''}. "
                          f"Hint: {exercise.hint} {replay}", n - 1)
        if guard.hit is not None:  # the student caught our exception: still a reference call
            return result(False, "uses_reference", _reference_message(exercise, guard.hit), n - 1)
        try:
            wrong = case.compare(got, case.expected)
        except Exception as err:  # a result so odd that comparing it failed
            wrong = f"the result could not be compared ({type(err).__name__}: {err}); got {describe(got)}"
        if wrong:
            return result(False, "failed",
                          f"case {n} of {len(cases)}{' [' + case.note + ']' if case.note else ''}: "
                          f"{_call_description(case)}: {wrong}.{_values(case.expected, got)} Hint: {exercise.hint} "
                          f"{replay}", n - 1)
    return result(True, "passed", "the 1 case matches the reference" if len(cases) == 1 else
                  f"all {len(cases)} cases match the reference", len(cases))
