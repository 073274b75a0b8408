"""``tdproxy rollout``: move traffic to one backend step by step, judge every step on the running
proxies' own metrics, and roll back on failure.

Theory of operation: the config file stays the one source of truth. Every step is a weight edit
of the file (the same validated, comment-preserving, atomic path as ``tdproxy weights set``),
which the proxies apply as an ordinary reload; the command keeps no state a proxy depends on, so
whenever it stops, traffic is where the file says. A step:

1. starts: the step's weights are written (after checking that nobody else changed the weights
   since the last write), and the step's interval starts counting;
2. waits until every proxy reports those weights (``APPLY_TIMEOUT`` at most), and reads each
   one's counters for ``to``: the start of the judged window;
3. looks at every proxy once a second until the interval ends: ``to`` unhealthy, a proxy
   unreachable (``UNREACHABLE_LOOKS`` looks in a row) or other weights served fail the step at
   once, and so does a window that already holds ``--min-requests`` and is over a limit;
4. at the end of the interval judges the window (:mod:`.judge`): ok, too few requests (extend by
   one interval, at most ``MAX_EXTENSIONS`` times, then fail), or over a limit (fail).

A failure, SIGINT or SIGTERM writes back every weight as it was before the first step and waits
(``APPLY_TIMEOUT``) until every proxy reports it. Signals only set a flag, which the waits check
every ``TICK`` seconds, so no write is ever cut in the middle; a signal during the rollback does
not stop the write, only the wait for the proxies' confirmation after it.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType

from tdproxy import weights
from tdproxy.config.durations import parse_duration
from tdproxy.config.loader import ConfigError, resolve_path
from tdproxy.config.writer import NotWritable, is_configmap_mount, read_only_reason, replace_file
from tdproxy.config.yaml_edit import EditError
from tdproxy.controlplane.admin import admin_token
from tdproxy.rollout.judge import Counters, Limits, judge, p99_text, percent_text, total
from tdproxy.rollout.output import (
    Reporter,
    duration_text,
    json_number,
    plain_weights,
    weights_text,
)
from tdproxy.rollout.plan import (
    MAX_EXTENSIONS,
    Plan,
    RolloutError,
    Step,
    make_plan,
    parse_steps,
)
from tdproxy.rollout.proxies import Look, Proxy, Unreachable, preflight, proxies_for
from tdproxy.weights_file import load_and_build, prepare_weights

EXIT_PROMOTED = 0
EXIT_CANNOT_WRITE = 1
EXIT_INVALID = 2
EXIT_ROLLED_BACK = 3

APPLY_TIMEOUT = 10.0  # seconds every proxy has to report newly written weights
LOOK_SECONDS = 1.0  # how often the proxies are read during a step
UNREACHABLE_LOOKS = 3  # failed looks in a row that make a proxy unreachable
TICK = 0.1  # how often a wait checks for a signal
MIN_INTERVAL = 1.0


class Interrupts:
    """SIGINT/SIGTERM handlers that only remember the first signal (and count them)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.count = 0
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        if self.signum is None:
            self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""


@dataclass(frozen=True)
class Options:
    path: str
    plan: Plan
    limits: Limits
    admins: tuple[str, ...]
    token: str | None
    dry_run: bool
    json_lines: bool


def parse_options(args: argparse.Namespace) -> tuple[Options, str]:
    """The validated options and the config file's text; ``RolloutError`` or ``ConfigError``."""
    path = resolve_path(args.config)
    steps = parse_steps(args.steps)
    interval = _duration("--interval", args.interval)
    if interval < MIN_INTERVAL:
        raise RolloutError(f"--interval {args.interval}: must be at least 1s")
    max_p99 = (
        None if args.max_p99.strip().lower() == "off" else _duration("--max-p99", args.max_p99)
    )
    rate = _rate(args.max_error_rate)
    if args.min_requests < 1:
        raise RolloutError("--min-requests: must be at least 1")
    text, config = load_and_build(path)
    plan = make_plan(config, args.to, tuple(args.sources or ()), steps, interval)
    for step in plan.steps:  # every step's text must validate before the first is written
        try:
            prepare_weights(path, step.weights, text=text, config=config)
        except (weights.WeightsError, EditError) as exc:
            raise RolloutError(
                f"step {step.number} ({plain_weights(step.weights)}): {exc}"
            ) from None
    token = args.token
    if token is None:
        token = admin_token(config.admin)[1]
    limits = Limits(rate, max_p99, args.min_requests)
    options = Options(path, plan, limits, tuple(args.admin or ()), token, args.dry_run, args.json)
    return options, text


def _duration(option: str, value: str) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise RolloutError(f"{option}: {exc}") from None


def _rate(value: str) -> float:
    text = value.strip()
    try:
        rate = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise RolloutError(
            f"--max-error-rate {value!r}: expected a fraction such as 0.01 or 1%"
        ) from None
    if not 0 <= rate <= 1 or math.isnan(rate):
        raise RolloutError(f"--max-error-rate {value!r}: must be between 0 and 1 (or 0% and 100%)")
    return rate


def main(args: argparse.Namespace) -> int:
    """``tdproxy rollout``: returns the exit status."""
    reporter = Reporter(
        sys.stdout, json_lines=args.json, progress=not args.json and sys.stdout.isatty()
    )
    interrupts = Interrupts()
    interrupts.install()
    try:
        return _main(args, reporter, interrupts)
    finally:
        reporter.clear()
        interrupts.restore()


def _main(args: argparse.Namespace, reporter: Reporter, interrupts: Interrupts) -> int:
    try:
        options, text = parse_options(args)
    except ConfigError as exc:
        return _refuse(reporter, exc.describe(), EXIT_INVALID)
    except RolloutError as exc:
        return _refuse(reporter, f"tdproxy rollout: {exc}; nothing was written", EXIT_INVALID)
    plan = options.plan
    if options.dry_run:
        _report_plan(reporter, plan, [])
        reporter.event(
            "verdict",
            "dry run: nothing written, no proxy asked",
            result="dry_run",
            exit=EXIT_PROMOTED,
        )
        return EXIT_PROMOTED
    refusal = _not_writable(options.path)
    if refusal is not None:
        return _refuse(reporter, refusal, EXIT_CANNOT_WRITE)
    try:
        proxies = proxies_for_options(options)
        preflight(proxies, options.path, plan.to, plan.original)
    except RolloutError as exc:
        return _refuse(reporter, f"tdproxy rollout: {exc}; nothing was written", EXIT_INVALID)
    if interrupts.signum is not None:
        return _refuse(reporter, f"{interrupts.name}: nothing was written", 128 + interrupts.signum)
    _report_plan(reporter, plan, proxies)
    return Rollout(options, text, proxies, reporter, interrupts).run()


def proxies_for_options(options: Options) -> list[Proxy]:
    _, config = load_and_build(options.path)
    return proxies_for(config, options.admins, options.token)


def _refuse(reporter: Reporter, message: str, code: int) -> int:
    print(message, file=sys.stderr)
    reporter.event_json_only("verdict", result="refused", exit=code, reason=message)
    return code


def _not_writable(path: str) -> str | None:
    """Why the rollout may not write the file (checked before the first step), or None."""
    if is_configmap_mount(path):
        return (
            f"tdproxy rollout: {path} is mounted from a Kubernetes ConfigMap: a rollout edits "
            "the file, which the kubelet would overwrite; use a rollout controller that changes "
            "the ConfigMap (see docs/rollout.md); nothing was written"
        )
    try:
        reason = read_only_reason(os.path.realpath(path))
    except OSError as exc:
        reason = exc.strerror or str(exc)
    if reason is not None:
        return f"tdproxy rollout: cannot write {path}: {reason}; nothing was written"
    return None


def _report_plan(reporter: Reporter, plan: Plan, proxies: Sequence[Proxy]) -> None:
    count = len(plan.steps)
    sources = ", ".join(plan.sources)
    head = (
        f"plan: {plan.to} from {sources}, {count} steps of {duration_text(plan.interval)}: "
        f"{duration_text(plan.shortest)} at least, {duration_text(plan.longest)} at most "
        f"(a step short of traffic is extended up to {MAX_EXTENSIONS} times)"
    )
    lines = [head]
    lines += [f"  step {s.number}/{count}  {weights_text(s.weights)}" for s in plan.steps]
    if proxies:
        noun = "proxy" if len(proxies) == 1 else "proxies"
        lines.append(f"judged on {len(proxies)} {noun}: {', '.join(p.url for p in proxies)}")
    reporter.event(
        "plan",
        "\n".join(lines),
        to=plan.to,
        sources=list(plan.sources),
        steps=[{"step": s.number, "percent": s.percent, "weights": s.weights} for s in plan.steps],
        original=plan.original,
        interval_seconds=plan.interval,
        shortest_seconds=plan.shortest,
        longest_seconds=plan.longest,
        proxies=[proxy.url for proxy in proxies],
    )


class Rollout:
    """One rollout from the first step to the verdict."""

    def __init__(
        self,
        options: Options,
        original_text: str,
        proxies: Sequence[Proxy],
        reporter: Reporter,
        interrupts: Interrupts,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.options = options
        self.plan = options.plan
        self.original_text = original_text
        self.proxies = list(proxies)
        self.reporter = reporter
        self.interrupts = interrupts
        self.clock = clock
        self.sleep = sleep
        self.written: dict[str, int] = dict(self.plan.original)  # what the file should hold

    # -- the steps ------------------------------------------------------------------------

    def run(self) -> int:
        started = self.clock()
        for step in self.plan.steps:
            reason = self._step(step)
            if reason is None and self.interrupts.signum is not None:
                reason = self._interrupted_reason(step)
            if reason is not None:
                return self._roll_back(reason)
        drained = self.plan.sources
        took = duration_text(self.clock() - started)
        self.reporter.event(
            "verdict",
            f"verdict: promoted {self.plan.to} to 100% in {took} "
            f"({', '.join(drained)} at 0: drained)",
            result="promoted",
            exit=EXIT_PROMOTED,
            weights=self.written,
        )
        return EXIT_PROMOTED

    def _label(self, step: Step) -> str:
        return f"step {step.number}/{len(self.plan.steps)}  {self.plan.to} {step.percent}%"

    def _interrupted_reason(self, step: Step) -> str:
        return f"interrupted by {self.interrupts.name} at {self._label(step)}"

    def _step(self, step: Step) -> str | None:
        """Run one step; None when it passed, else why it failed."""
        start = self.clock()
        problem = self._write(step.weights)
        if problem is not None:
            return f"{self._label(step)}: {problem}"
        self.reporter.event_json_only(
            "written", step=step.number, of=len(self.plan.steps), weights=step.weights
        )
        looks = self._wait_applied(step)
        if isinstance(looks, str):
            return looks
        generations = {proxy.url: looks[proxy.url].generation for proxy in self.proxies}
        others = {name: w for name, w in step.weights.items() if name != self.plan.to}
        shown = sorted(set(generations.values()))
        self.reporter.event(
            "applied",
            f"{self._label(step)}  {weights_text(others)}  applied "
            f"(generation {', '.join(map(str, shown))})",
            step=step.number,
            of=len(self.plan.steps),
            percent=step.percent,
            weights=step.weights,
            generations=generations,
        )
        return self._watch(step, start, looks)

    def _write(self, new: Mapping[str, int]) -> str | None:
        """Write ``new`` into the file; None when done, else why not."""
        try:
            text, config = load_and_build(self.options.path)
        except ConfigError as exc:
            return "the config file is no longer valid: " + "; ".join(exc.errors)
        found = weights.weights_of(config)
        if found != self.written:
            return (
                "the weights in the file were changed by someone else during the rollout "
                f"({plain_weights(found)}, expected {plain_weights(self.written)})"
            )
        try:
            edit = prepare_weights(self.options.path, new, text=text, config=config)
            edit.write()
        except (weights.WeightsError, EditError, NotWritable) as exc:
            return str(exc)
        self.written = edit.after
        return None

    def _wait_applied(self, step: Step) -> dict[str, Look] | str:
        """Every proxy's look once it reports the weights written; else why not."""
        deadline = self.clock() + APPLY_TIMEOUT
        looks: dict[str, Look] = {}
        last_problem: dict[str, str] = {}
        while True:
            for proxy in self.proxies:
                if proxy.url in looks:
                    continue
                try:
                    look = proxy.look(self.plan.to)
                except Unreachable as exc:
                    last_problem[proxy.url] = str(exc)
                    continue
                if look.weights == self.written:
                    looks[proxy.url] = look
                else:
                    last_problem[proxy.url] = f"it reports {plain_weights(look.weights)}"
            if len(looks) == len(self.proxies):
                return looks
            if self.interrupts.signum is not None:
                return self._interrupted_reason(step)
            if self.clock() >= deadline:
                waiting = [url for url in (p.url for p in self.proxies) if url not in looks]
                return (
                    f"{self._label(step)}: the proxy at {waiting[0]} did not apply the new "
                    f"weights within {APPLY_TIMEOUT:.0f} s ({last_problem.get(waiting[0], '')})"
                )
            if not self._pause(0.1):
                return self._interrupted_reason(step)

    def _watch(self, step: Step, start: float, baseline: dict[str, Look]) -> str | None:
        """Look at the proxies until the step's interval (and its extensions) end; judge."""
        interval = self.plan.interval
        end = start + interval
        extensions = 0
        latest = dict(baseline)
        misses = dict.fromkeys(latest, 0)
        window = Counters()
        complete = True
        while True:
            # After a look that missed a proxy, wait a whole period even past the end, so that
            # "unreachable" always means UNREACHABLE_LOOKS periods without an answer.
            until = self.clock() + LOOK_SECONDS
            if complete:
                until = min(until, end)
            if not self._pause_until(until, step, start, end, window):
                return self._interrupted_reason(step)
            problem, complete = self._look_all(latest, misses)
            if problem is not None:
                self._report_judged(step, window, "failed", problem)
                return f"{self._label(step)}: {problem}"
            window = total(
                _since(baseline[url], latest[url]) for url in (p.url for p in self.proxies)
            )
            final = complete and self.clock() >= end
            verdict = judge(window, self.options.limits, final=final)
            if verdict.outcome == "fail":
                self._report_judged(step, window, "failed", verdict.reason)
                return f"{self._label(step)}: {verdict.reason}"
            if not final:
                continue
            if verdict.outcome == "ok":
                self._report_judged(step, window, "ok", "")
                return None
            if extensions == MAX_EXTENSIONS:
                reason = f"not enough traffic to judge ({verdict.reason})"
                self._report_judged(step, window, "failed", reason)
                return f"{self._label(step)}: {reason}"
            extensions += 1
            end += interval
            self._report_judged(
                step,
                window,
                "extended",
                f"{verdict.reason}; extended by {duration_text(interval)} "
                f"({extensions} of {MAX_EXTENSIONS})",
            )

    def _look_all(self, latest: dict[str, Look], misses: dict[str, int]) -> tuple[str | None, bool]:
        """Read every proxy into ``latest``: (why the step fails now or None, whether every
        proxy answered this time)."""
        complete = True
        to = self.plan.to
        for proxy in self.proxies:
            try:
                look = proxy.look(to)
            except Unreachable as exc:
                complete = False
                misses[proxy.url] += 1
                if misses[proxy.url] >= UNREACHABLE_LOOKS:
                    return f"the proxy is unreachable ({exc})", False
                continue
            misses[proxy.url] = 0
            latest[proxy.url] = look
            if not look.healthy(to):
                reason = look.backends.get(to, {}).get("health_reason", "")
                return f"{to} became unhealthy at {proxy.url} ({reason})", complete
            if look.weights != self.written:
                return (
                    f"the proxy at {proxy.url} now serves other weights "
                    f"({plain_weights(look.weights)}): changed outside the rollout"
                ), complete
        return None, complete

    def _report_judged(self, step: Step, window: Counters, result: str, reason: str) -> None:
        text = (
            f"{self._label(step)}  {window.requests} requests  "
            f"{percent_text(window.error_rate)} errors  p99 {p99_text(window)}  {result}"
        )
        self.reporter.event(
            "judged",
            f"{text}: {reason}" if reason else text,
            step=step.number,
            of=len(self.plan.steps),
            percent=step.percent,
            requests=window.requests,
            errors=window.errors,
            error_rate=window.error_rate,
            p99_seconds=json_number(window.p99()),
            p99=p99_text(window),
            result=result,
            reason=reason,
        )

    # -- waiting --------------------------------------------------------------------------

    def _pause(self, seconds: float) -> bool:
        """Sleep ``seconds``; False as soon as a signal has come."""
        return self._pause_until(self.clock() + seconds)

    def _pause_until(
        self,
        until: float,
        step: Step | None = None,
        start: float = 0.0,
        end: float = 0.0,
        window: Counters | None = None,
    ) -> bool:
        while True:
            if self.interrupts.signum is not None:
                return False
            now = self.clock()
            if step is not None and window is not None:
                note = f"{window.requests} requests so far"
                self.reporter.progress(self._label(step), now - start, end - start, note)
            if now >= until:
                return True
            self.sleep(min(TICK, until - now))

    # -- rolling back ---------------------------------------------------------------------

    def _roll_back(self, reason: str) -> int:
        signum = self.interrupts.signum
        seen = self.interrupts.count
        self.reporter.event("rollback", f"rolling back: {reason}", reason=reason)
        original = self.plan.original
        problem = self._restore()
        if problem is not None:
            message = (
                f"tdproxy rollout: ROLLBACK FAILED: {problem}. The file may still hold "
                f"{plain_weights(self.written)}; restore the original weights with: "
                f"tdproxy weights set {plain_weights(original)} --config {self.options.path}"
            )
            print(message, file=sys.stderr)
            self.reporter.event_json_only(
                "verdict", result="rollback_failed", exit=EXIT_CANNOT_WRITE, reason=problem
            )
            return EXIT_CANNOT_WRITE
        confirmed = self._wait_restored(seen)
        text = f"rolled back: {weights_text_plain(original)} (the weights before the rollout)"
        if confirmed is True:
            text += ", applied by every proxy"
        elif confirmed is False:
            text += f"; not yet reported by every proxy within {APPLY_TIMEOUT:.0f} s (see its log)"
        else:
            text += "; stopped waiting for the proxies on a second signal"
        self.reporter.event("rolled_back", text, weights=original, confirmed=confirmed is True)
        code = EXIT_ROLLED_BACK if signum is None else 128 + signum
        result = "rolled_back" if signum is None else "interrupted"
        self.reporter.event(
            "verdict",
            f"verdict: {result.replace('_', ' ')} (exit {code}): {reason}",
            result=result,
            exit=code,
            reason=reason,
        )
        return code

    def _restore(self) -> str | None:
        """Write every original weight back; when the file cannot be edited (someone broke it
        meanwhile), write back the whole file as it was before the first step."""
        original = self.plan.original
        try:
            text, config = load_and_build(self.options.path)
            edit = prepare_weights(self.options.path, original, text=text, config=config)
            if edit.changed:
                edit.write()
            self.written = dict(original)
            return None
        except NotWritable as exc:
            return str(exc)
        except (ConfigError, weights.WeightsError, EditError):
            pass
        try:
            replace_file(self.options.path, self.original_text)
        except NotWritable as exc:
            return str(exc)
        self.written = dict(original)
        return None

    def _wait_restored(self, seen: int) -> bool | None:
        """True once every proxy reports the original weights, False after ``APPLY_TIMEOUT``,
        None when a signal beyond the ``seen`` ones said to stop waiting."""
        deadline = self.clock() + APPLY_TIMEOUT
        pending = list(self.proxies)
        while pending:
            for proxy in list(pending):
                try:
                    if proxy.look(self.plan.to).weights == self.plan.original:
                        pending.remove(proxy)
                except Unreachable:
                    pass
            if not pending:
                return True
            if self.clock() >= deadline:
                return False
            pause_until = self.clock() + 0.1
            while self.clock() < pause_until:
                if self.interrupts.count > seen:
                    return None
                self.sleep(0.02)
        return True


def _since(baseline: Look, latest: Look) -> Counters:
    """``to``'s counters over the window at one proxy; a proxy that restarted meanwhile counts
    from its start."""
    if latest.started_at != baseline.started_at:
        return latest.counters
    return latest.counters.minus(baseline.counters)


def weights_text_plain(weights_: Mapping[str, int]) -> str:
    return ", ".join(f"{name} {weight}" for name, weight in weights_.items())
