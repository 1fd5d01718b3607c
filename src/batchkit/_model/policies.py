"""Policies: frozen, validated configuration values. ``None`` for a policy means "off"."""

from __future__ import annotations

import math
import time
from dataclasses import KW_ONLY, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, final, runtime_checkable

from .errors import InvalidArgument
from .state import check_key
from .transient import RetryOn, matches, transient

if TYPE_CHECKING:
    import random  # imported when an rng is given (start-up time)
    from collections.abc import Callable

    from .state import StateStore

__all__ = [
    "Adaptive",
    "AsyncLimiter",
    "Backoff",
    "Breaker",
    "Deadline",
    "FailureRatio",
    "Hedge",
    "LimitGroup",
    "RateLimit",
    "Remembered",
    "Retry",
    "RetryOn",
]


def _check_number(name: str, value: object, *, minimum: float = 0.0, strict: bool = True) -> float:
    """Validate a finite real number ``> minimum`` (or ``>=`` when not strict)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"{name} must be a number of seconds, got {value!r}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if math.isnan(number) or math.isinf(number):
        raise InvalidArgument(f"{name} must be finite, got {value!r}")
    if value < minimum or (strict and value == minimum):
        op = ">" if strict else ">="
        raise InvalidArgument(f"{name} must be {op} {minimum:g}, got {value!r}")
    return number


def _check_error_matcher(name: str, on: object, hint: str) -> None:
    """``retry_on=`` / ``overload_on=``: Exception subclasses (one or a tuple) or a predicate."""
    if isinstance(on, type | tuple):
        for t in on if isinstance(on, tuple) else (on,):
            if not (isinstance(t, type) and issubclass(t, Exception)):
                raise InvalidArgument(
                    f"{name} must hold Exception subclasses, got {t!r}\nHINT: {hint}"
                )
    elif not callable(on):
        raise InvalidArgument(
            f"{name} must be exception types or a predicate, got {on!r}\nHINT: {hint}"
        )


def _check_int(name: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise InvalidArgument(f"{name} must be >= {minimum}, got {value!r}")
    return value


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class Backoff:
    """Exponential backoff with full jitter, capped.

    The wait before retry ``n`` (1 for the first retry) is drawn uniformly from
    ``[0, min(maximum, initial * multiplier ** (n - 1))]`` (``jitter=True``, the default,
    which spreads retries of many items apart), or is exactly that ceiling (``jitter=False``).
    """

    initial: float = 0.1
    maximum: float = 10.0
    multiplier: float = 2.0
    jitter: bool = True

    def __post_init__(self) -> None:
        _check_number("Backoff.initial", self.initial, strict=False)
        _check_number("Backoff.maximum", self.maximum, strict=False)
        _check_number("Backoff.multiplier", self.multiplier, minimum=1.0, strict=False)
        if self.maximum < self.initial:
            raise InvalidArgument(
                f"Backoff.maximum ({self.maximum:g}) must be >= Backoff.initial ({self.initial:g})"
            )


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class Retry:
    """Retry failed attempts of an item.

    - ``attempts``: the most attempts per item, the first included (``attempts=1``: no retry).
    - ``retry_on``: exception types or a predicate; the default, :func:`batchkit.transient`,
      retries timeouts, network errors (``OSError``), errors with a ``retry_after`` hint and
      HTTP 429/5xx errors, and nothing else. ``CancelledError`` is never retried.
    - ``timeouts``: whether an attempt that hit the per-item ``timeout`` is retried.
    - An error with a ``retry_after`` attribute (seconds as a number or a string, or an HTTP
      date, e.g. from an HTTP 429's ``Retry-After``) makes the next attempt wait at least that
      long, but never more than ``max_retry_after`` seconds.
    - ``hold_slot``: keep the item's concurrency slot while it waits out the backoff. The default
      (``False``) frees the slot so other items run meanwhile, which is best for throughput;
      ``True`` keeps the pressure on a struggling upstream at ``concurrency`` at most.
    - ``rng``: the random source of the backoff's jitter (default: a fresh ``random.Random()``
      per run); pass ``random.Random(seed)`` for a reproducible run.
    A backoff never sleeps past the run's deadline: a retry that could not finish before it is
    not made, and the item ends ``"skipped"`` (``ItemSkipped("out_of_time")``, its last error
    as the cause).
    """

    attempts: int = 3
    backoff: Backoff = Backoff()
    retry_on: RetryOn = transient
    timeouts: bool = True
    hold_slot: bool = False
    max_retry_after: float = 60.0
    rng: random.Random | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_int("Retry.attempts", self.attempts, minimum=1)
        _check_number("Retry.max_retry_after", self.max_retry_after, strict=False)
        if self.rng is not None and not _is_random(self.rng):
            raise InvalidArgument(
                f"Retry.rng must be a random.Random or None, got {self.rng!r}\n"
                "HINT: Retry(rng=random.Random(42)) makes the jitter reproducible"
            )
        if not isinstance(self.backoff, Backoff):
            raise InvalidArgument(f"Retry.backoff must be a Backoff, got {self.backoff!r}")
        _check_error_matcher(
            "Retry.retry_on",
            self.retry_on,
            "CancelledError, KeyboardInterrupt and SystemExit are never retried.",
        )

    def should_retry(self, error: Exception) -> bool:
        """Whether ``retry_on`` selects ``error`` for another attempt."""
        return matches(self.retry_on, error)


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimit:
    """At most ``per_second`` attempt starts per second on average, ``burst`` at once at most.

    A token bucket that starts with ``burst`` tokens (default 1: no start-up burst at all) and
    refills continuously. Applies to every attempt, retries included, judged on the times
    attempts really start (a busy event loop never releases a bunch of overdue turns at once).

    ``weight(item)`` (e.g. ``lambda p: p.tokens``) makes each attempt start take that many
    tokens instead of one: ``per_second`` and ``burst`` then count weight (LLM tokens, bytes).
    It must return a number > 0 and at most ``burst``; otherwise that item fails with
    ``InvalidArgument`` (it could never be granted). Under a ``Deadline``, an item whose
    weight cannot be granted before the deadline is skipped (``out_of_time``).
    """

    per_second: float
    burst: int = 1
    weight: Callable[[Any], float] | None = None

    def __post_init__(self) -> None:
        _check_number("RateLimit.per_second", self.per_second)
        if not math.isfinite(1.0 / self.per_second):
            raise InvalidArgument(
                f"RateLimit.per_second is too small to be a rate, got {self.per_second!r}\n"
                "HINT: for fewer than one start a day, schedule the job instead"
            )
        _check_int("RateLimit.burst", self.burst, minimum=1)
        if self.weight is not None and not callable(self.weight):
            raise InvalidArgument(
                f"RateLimit.weight must be a callable taking an item, got {self.weight!r}\n"
                "HINT: RateLimit(per_second=1500, burst=90_000, weight=lambda p: p.tokens)"
            )


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class LimitGroup:
    """Limits per upstream (a host, a tenant, an API), for ``groups=``.

    ``by(item)`` names the group an item belongs to (e.g. ``lambda m: m.exchange``), or
    returns ``None`` for an item outside every group of this kind. Each group it names gets its
    own ``concurrency`` (attempts of its items at once) and its own ``rate_limit`` (attempt
    starts, as the run's ``RateLimit``), on top of the run's limits. Give one ``LimitGroup``
    per upstream an item touches: an item starts only when every one of its groups has room,
    and takes them all together (no partial holds). ``by`` is called once per item; if it
    raises (or returns an unhashable key), that item fails with its error.

    ``concurrency=Adaptive(...)`` gives each group its own adaptive limit, as the call's
    ``concurrency=Adaptive(...)`` does for the run: every group starts at ``initial`` and finds
    its own limit from its own items' attempts (one upstream's timeouts or ``overload_on``
    errors cut only its group's limit). ``remember=`` is not taken here (a limit per group
    value is not remembered between runs).

    ``rate_limit=RateLimit(..., weight=...)`` makes each attempt start take the item's weight
    from its group's bucket, as the call's weighted ``RateLimit`` does: a weight that is no
    number > 0 or above ``burst`` fails that item with ``InvalidArgument`` before any attempt;
    under a ``Deadline``, an item whose weight its group cannot grant in time is skipped
    (``out_of_time``).

    **Call-level groups.** A group with a ``name=`` and no ``by`` (``LimitGroup(name="news",
    concurrency=8)``) is never taken at admission: ``fn`` takes a place in it around one call,
    ``async with batchkit.limit("news"):``, as many times as it calls that upstream (three
    calls gathered take three places). It is one group for the whole run, with the same
    ``concurrency`` (or ``Adaptive``, moved by the blocks' own timeouts, ``overload_on``
    errors and latencies) and ``rate_limit`` (``limit(name, weight=...)`` takes that many
    tokens; ``RateLimit(weight=...)`` is refused here). A group with ``by`` is item-level,
    named or not; ``batchkit.limit()`` refuses its name. Names are unique within ``groups=``.
    """

    by: Callable[[Any], object] | None = None
    concurrency: int | Adaptive | None = None
    rate_limit: RateLimit | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        name: object = self.name
        if name is not None and (not isinstance(name, str) or not name):
            raise InvalidArgument(
                f"LimitGroup.name must be a non-empty str or None, got {name!r}\n"
                'HINT: LimitGroup(name="news", concurrency=8), then '
                'async with batchkit.limit("news"): in fn'
            )
        if self.by is None:
            self._check_call_level()
        elif not callable(self.by):
            raise InvalidArgument(
                f"LimitGroup.by must be a callable taking an item, got {self.by!r}\n"
                "HINT: LimitGroup(by=lambda item: item.host, concurrency=4)"
            )
        if isinstance(self.concurrency, Adaptive):
            if self.concurrency.remember is not None:
                raise InvalidArgument(
                    "LimitGroup.concurrency=Adaptive(remember=...) is not supported: each "
                    "group value finds its own limit within the run, and none is remembered\n"
                    "HINT: drop remember= here; the call's concurrency=Adaptive(...) may have one"
                )
        elif self.concurrency is not None:
            _check_int("LimitGroup.concurrency", self.concurrency, minimum=1)
        if self.rate_limit is not None and not isinstance(self.rate_limit, RateLimit):
            raise InvalidArgument(
                f"LimitGroup.rate_limit must be batchkit.RateLimit(...) or None, got "
                f"{self.rate_limit!r}"
            )
        if self.concurrency is None and self.rate_limit is None:
            raise InvalidArgument(
                "LimitGroup limits nothing: give concurrency=, rate_limit= or both\n"
                "HINT: LimitGroup(by=lambda item: item.host, concurrency=4)"
            )

    def _check_call_level(self) -> None:
        if self.name is None:
            raise InvalidArgument(
                "LimitGroup needs by= (an item-level group) or name= (a call-level group, "
                "taken in fn with batchkit.limit(name))\nHINT: LimitGroup(by=lambda item: "
                'item.host, concurrency=4), or LimitGroup(name="news", concurrency=8)'
            )
        if self.rate_limit is not None and self.rate_limit.weight is not None:
            raise InvalidArgument(
                f"LimitGroup(name={self.name!r}) without by= is a call-level group: its "
                "RateLimit takes no weight= callable (there is no item to weigh)\nHINT: drop "
                f"weight= and pass it per call: batchkit.limit({self.name!r}, weight=...)"
            )

    @property
    def call_level(self) -> bool:
        """Whether ``fn`` takes this group with ``batchkit.limit(name)`` (no ``by``)."""
        return self.by is None


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class Hedge:
    """Hedged attempts for stragglers, for ``hedge=``: an item whose attempt runs longer than
    ``after`` gets one more attempt beside it; the first to succeed wins and the other is
    cancelled (its context exits with the cancellation: a rollback).

    ``after``: seconds, or a quantile of this run's successful attempt durations such as
    ``"p95"`` (``"p50"`` to ``"p99.9"``; the latest 1024 count), used once ``min_samples``
    attempts have succeeded (no hedge before). ``budget``: at most this share of extra
    attempts, counted against the items started so far (``0.10``: one hedge per ten items).
    Hedges run in the run's slots and under its group and rate limits, like any attempt.

    A hedge runs the item twice at once, so the call must be safe to repeat: ``hedge=``
    needs ``key=``, and ``fn`` should send ``current_attempt().idempotency_key`` (the
    item's key) upstream, so a write the loser already committed is not made twice.
    """

    after: float | str = "p95"
    budget: float = 0.10
    min_samples: int = 20

    def __post_init__(self) -> None:
        if isinstance(self.after, str):
            hedge_quantile(self.after)
        else:
            _check_number("Hedge.after", self.after)
        budget: object = self.budget
        if isinstance(budget, bool) or not isinstance(budget, int | float) or not 0 < budget <= 1:
            raise InvalidArgument(
                f"Hedge.budget must be a share of the items started, > 0 and <= 1, got "
                f"{budget!r}\nHINT: Hedge(budget=0.10) allows one hedge per ten items"
            )
        _check_int("Hedge.min_samples", self.min_samples, minimum=1)

    @property
    def quantile(self) -> float | None:
        """``after`` as a quantile in (0, 1), or ``None`` when it is seconds."""
        return hedge_quantile(self.after) if isinstance(self.after, str) else None


def hedge_quantile(after: str) -> float:
    """``"p95"`` → ``0.95``; an :class:`InvalidArgument` for anything else."""
    try:
        q = float(after[1:]) / 100 if after[:1] == "p" else math.nan
    except ValueError:
        q = math.nan
    if not 0.5 <= q < 1:
        raise InvalidArgument(
            f"Hedge.after must be seconds or a quantile from 'p50' to 'p99.9', got {after!r}"
            "\nHINT: Hedge(after='p95') or Hedge(after=2.0)"
        )
    return q


@runtime_checkable
class AsyncLimiter(Protocol):
    """Any object used as ``async with limiter:`` before each attempt (e.g. aiolimiter's)."""

    async def __aenter__(self) -> object: ...
    async def __aexit__(self, *exc_info: object) -> bool | None: ...


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class Deadline:
    """When the whole run must end.

    Give ``seconds`` (from the call's start) or ``at`` (an absolute ``loop.time()``). When it
    comes, in-flight items are cancelled, items not started are skipped, and the call returns
    the partial report on time: within ``grace`` seconds (plus one loop turn) as long as the
    cancelled code awaits.

    Before the deadline, an attempt starts only if it can be expected to finish in time: by the
    item's ``cost=`` hint, else a high quantile (p75) of this run's attempt durations so far,
    else (nothing observed yet) it starts. When nothing more fits, the run stops starting items
    (stop reason ``"out_of_time"``) and returns early. ``fit_timeout=True`` uses the worst
    case instead: an attempt starts only if its whole ``timeout`` fits.

    ``grace``: after the deadline (or a timeout's cancel) batchkit waits at most this long for
    cancelled work to clean up, cancels it once more, then abandons it (``report.abandoned``).
    """

    seconds: float | None = None
    at: float | None = None
    fit_timeout: bool = False
    grace: float = 1.0

    def __post_init__(self) -> None:
        if (self.seconds is None) == (self.at is None):
            raise InvalidArgument("Deadline takes exactly one of seconds= or at=")
        if self.seconds is not None:
            _check_number("Deadline.seconds", self.seconds)
        if self.at is not None:
            _check_number("Deadline.at", self.at, minimum=-math.inf)
        _check_number("Deadline.grace", self.grace, strict=False)


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class FailureRatio:
    """Stop the run when more than ``ratio`` of finished items failed, once ``min_sample`` finished.

    Failures are ``error`` and ``timeout`` outcomes.
    """

    ratio: float
    min_sample: int = 10

    def __post_init__(self) -> None:
        _check_number("FailureRatio.ratio", self.ratio, strict=False)
        if self.ratio >= 1:
            raise InvalidArgument(f"FailureRatio.ratio must be < 1, got {self.ratio!r}")
        _check_int("FailureRatio.min_sample", self.min_sample, minimum=1)


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class Remembered:
    """Where :class:`Adaptive` keeps its limit between runs: ``Adaptive(remember=...)``.

    Before the first item starts, the run reads the remembered limit from ``store`` and starts
    there (kept within the run's ``[min, max]``, and without slow start), instead of at
    ``initial``. When the run ends — completed, stopped, or cancelled by the caller — it
    moves the remembered limit ``weight`` of the way towards its own final limit, so one bad
    tick (an outage that cut the limit to ``min``) moves the next start only part of the way.
    The first run, with nothing remembered, starts at ``initial`` and remembers its final
    limit as it is.

    A store that fails (a read or a write raising an ``Exception``) never fails the run: the
    run logs a warning on the ``batchkit`` logger and starts from ``initial`` (read) or keeps
    its report (write). A cancellation is never swallowed.

    Attributes:
        store: Any :class:`~batchkit.StateStore`, e.g. ``SQLAlchemyStateStore(engine)`` for
            cron jobs (a new process every tick).
        name: The job's name; the limit is kept under the key ``"batchkit/adaptive/<name>"``.
            Runs with the same name share one remembered limit.
        weight: How far one run's final limit moves the remembered one, in ``(0, 1]``:
            ``remembered + weight * (final - remembered)``. ``1`` remembers the last run only.
    """

    store: StateStore
    name: str
    weight: float = 0.5

    def __post_init__(self) -> None:
        _check_stored(
            "Remembered", self.store, self.name, self.key, "name the job, e.g. name='prices'"
        )
        w: object = self.weight
        if isinstance(w, bool) or not isinstance(w, int | float) or not 0 < w <= 1:
            raise InvalidArgument(
                f"Remembered.weight must be a number in (0, 1], got {w!r}\n"
                "HINT: 0.5 moves the remembered limit half way to each run's final one"
            )

    @property
    def key(self) -> str:
        """The store key that holds the limit."""
        return f"batchkit/adaptive/{self.name}"


@final
@dataclass(frozen=True, slots=True)
class Breaker:
    """A circuit breaker kept between runs: ``breaker=Breaker(store, name=...)``.

    A circuit (one per ``by(item)`` value, or one for the whole run when ``by`` is ``None``)
    opens after ``open_after`` consecutive failed attempts of the kinds in ``on``. While it
    is open its items end ``skipped`` with the reason ``circuit_open`` (not counted by
    ``max_failures``, ``max_failure_ratio`` or ``fail_fast``). ``cool_down`` seconds after it
    opened it is half-open: one probe attempt at a time, while the circuit's other items wait
    for its verdict (in their places); its success closes the circuit and lets them start,
    its failure opens it again for another ``cool_down`` and skips them. For a cron job, a
    ``cool_down`` shorter than the period minus a tick's length makes every tick of an
    outage start half-open: it costs one probe, and the first tick after it does its work.

    The circuits are read from ``store`` before the first item starts and written back when
    one opens and when the run ends (merged by compare-and-set), so runs and processes that
    share the store share the circuits, with no store round trip per item. A store that
    fails never fails the run: a warning is logged and the run goes on with closed circuits
    (read) or keeps its report (write).

    Attributes:
        store: Any :class:`~batchkit.StateStore`.
        name: The breaker's name; its circuits are kept under ``"batchkit/breaker/<name>"``.
        by: The circuit of an item (its value is turned into a ``str``); ``None``: one circuit.
        open_after: Consecutive failed attempts that open a circuit (``>= 1``).
        cool_down: Seconds an open circuit waits before its probe (``>= 0``); for a cron
            job, at most the period minus a tick's longest run.
        on: The attempt kinds that count as failures: ``"error"``, ``"timeout"`` or both.
        clock: Seconds since the epoch, what opening times are kept in (``time.time``; a
            test passes its own).
    """

    store: StateStore
    _: KW_ONLY
    name: str
    by: Callable[[Any], object] | None = None
    open_after: int = 5
    cool_down: float = 30.0
    on: tuple[str, ...] = ("error", "timeout")
    clock: Callable[[], float] = field(default=time.time, repr=False)

    def __post_init__(self) -> None:
        _check_stored(
            "Breaker", self.store, self.name, self.key, "name the upstream, e.g. name='prices-api'"
        )
        if self.by is not None and not callable(self.by):
            raise InvalidArgument(f"Breaker.by must be a callable or None, got {self.by!r}")
        n: object = self.open_after
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidArgument(
                f"Breaker.open_after must be an int >= 1, got {n!r}\n"
                "HINT: open_after=5 opens after five failures in a row"
            )
        c: object = self.cool_down
        if isinstance(c, bool) or not isinstance(c, int | float) or not 0 <= c < math.inf:
            raise InvalidArgument(f"Breaker.cool_down must be seconds >= 0, got {c!r}")
        on: object = self.on
        if not isinstance(on, tuple) or not on or not all(k in ("error", "timeout") for k in on):
            raise InvalidArgument(
                f"Breaker.on must be a non-empty tuple of 'error' and 'timeout', got {on!r}"
            )
        if not callable(self.clock):
            raise InvalidArgument(f"Breaker.clock must be a callable, got {self.clock!r}")

    @property
    def key(self) -> str:
        """The store key that holds the circuits."""
        return f"batchkit/breaker/{self.name}"


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class Adaptive:
    """An adaptive concurrency limit (AIMD), for ``concurrency=``.

    Starts at ``initial`` and doubles per round trip (slow start) until the first overload
    signal. After that, each success whose latency stays under ``latency_factor`` times the
    baseline (the fastest recent item) grows the limit by ``1 / limit`` (about +1 per round
    trip), and much more slowly near the limit where the last overload happened. An overload
    signal — a timeout, an error matching ``overload_on`` (e.g. HTTP 429), a slow success, or
    an attempt still running past ``latency_factor`` times the baseline — multiplies the limit
    by ``decrease``, once per round: signals from attempts launched before the last cut are
    not counted again. The limit always stays within ``[min, max]``; the report's
    ``limit_changes`` records every move.

    With ``remember=Remembered(store=..., name=...)`` a run starts from the limit earlier runs
    ended at (see :class:`Remembered`), and the report's ``concurrency`` is that start.
    """

    initial: int = 4
    min: int = 1
    max: int = 64
    decrease: float = 0.75
    latency_factor: float = 2.0
    overload_on: RetryOn | None = None
    remember: Remembered | None = None

    def __post_init__(self) -> None:
        _check_int("Adaptive.min", self.min, minimum=1)
        _check_int("Adaptive.max", self.max, minimum=self.min)
        _check_int("Adaptive.initial", self.initial, minimum=self.min)
        if self.initial > self.max:
            raise InvalidArgument(
                f"Adaptive.initial ({self.initial}) must be <= Adaptive.max ({self.max})"
            )
        _check_number("Adaptive.decrease", self.decrease)
        if self.decrease >= 1:
            raise InvalidArgument(f"Adaptive.decrease must be < 1, got {self.decrease!r}")
        _check_number("Adaptive.latency_factor", self.latency_factor, minimum=1.0)
        if self.overload_on is not None:
            _check_error_matcher(
                "Adaptive.overload_on",
                self.overload_on,
                "overload_on=(RateLimited,) or a predicate, e.g. lambda e: isinstance(e, Busy)",
            )
        if self.remember is not None and not isinstance(self.remember, Remembered):
            raise InvalidArgument(
                f"Adaptive.remember must be a Remembered, got {self.remember!r}\n"
                "HINT: remember=Remembered(store=store, name='prices')"
            )

    def is_overload(self, error: Exception) -> bool:
        """Whether ``overload_on`` counts ``error`` as an overload signal."""
        on = self.overload_on
        return on is not None and matches(on, error)


def _is_random(rng: object) -> bool:
    import random  # lazy: start-up time; only a Retry given an rng gets here

    return isinstance(rng, random.Random)


def _check_stored(owner: str, store: object, name: object, key: str, hint: str) -> None:
    """What a policy kept in a state store needs: a store, a name, a valid key from the name."""
    missing = [m for m in ("get", "compare_and_set") if not callable(getattr(store, m, None))]
    if missing:
        raise InvalidArgument(
            f"{owner}.store must be a StateStore, got {store!r} (no "
            f"{', '.join(missing)})\nHINT: pass MemoryStateStore() or "
            "batchkit.sqlalchemy.SQLAlchemyStateStore(engine)"
        )
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"{owner}.name must be a non-empty str, got {name!r}\nHINT: {hint}")
    check_key(key)
