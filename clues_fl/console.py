"""The console: one status line per phase (and round) with counts and time; Flower's
per-phase strategy banner and the libraries' deprecation warnings kept out of it (they
go to the run's log file: `setup(log_file)`); progress bars only where they render.
Importing the package changes no warning filter: only a run's console is quietened.

`CLUES_FL_VERBOSE=1` (the launcher's `--verbose`) keeps Flower's banner and the warnings.
Progress: a tqdm bar when stderr is a terminal, else one line every
`CLUES_FL_PROGRESS_SECONDS` (default 30) for loops that run that long.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from pathlib import Path

VERBOSE_ENV = "CLUES_FL_VERBOSE"
PROGRESS_ENV = "CLUES_FL_PROGRESS_SECONDS"

log = logging.getLogger("clues_fl")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


class LibraryWarnings(logging.Filter):
    """Drops the libraries' FutureWarnings and DeprecationWarnings (transformers, torch,
    Ray, peft: one per process per location, repeated by every site) from the console,
    unless verbose; the run's log file keeps them."""

    CATEGORIES = ("FutureWarning", "DeprecationWarning")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "py.warnings" or verbose():
            return True
        return not any(f": {c}:" in record.getMessage() for c in self.CATEGORIES)


class FlowerBanner(logging.Filter):
    """Drops what the strategies log at every start() and round (the strategy summaries,
    `fraction_evaluate is set to 0.0`, `ConfigRecord (evaluate): (empty!)`, `[ROUND i/n]`,
    the final results): CLUES runs the rounds strategy once per round phase, and logs its
    own line per round. Keeps the strategies' warnings and the DP accounting."""

    KEEP = ("Privacy spent", "Waiting for nodes")
    STRATEGIES = ("/flwr/serverapp/strategy/", "/clues_fl/strategies/")

    def filter(self, record: logging.LogRecord) -> bool:
        path = record.pathname.replace("\\", "/")
        if not any(where in path for where in self.STRATEGIES) or verbose():
            return True
        message = record.getMessage()
        if "is set to 0.0" in message:
            return False
        return record.levelno > logging.INFO or any(k in message for k in self.KEEP)


_held: list[warnings.WarningMessage] = []
_held_records: list[logging.LogRecord] = []


class _Holding(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        _held_records.append(record)


@contextlib.contextmanager
def held_warnings():
    """Holds the warnings and the library log lines raised inside (an app module's
    imports: peft pulls in bitsandbytes, which calls torch.compile, which warns, and which
    logs that it found no optional CPU kernel) until `setup()` puts them in the run's log
    file: a Flower app process prints them before any run's console exists, so without
    this they reach the user's console from every site."""
    root, holding = logging.getLogger(), _Holding(logging.WARNING)
    root.addHandler(holding)
    try:
        with warnings.catch_warnings(record=True) as caught:
            yield
    finally:
        root.removeHandler(holding)
    _held.extend(caught)


def setup(log_file: Path | None = None) -> None:
    """A run's console: this package's INFO lines through Flower's console handler;
    Flower's strategy banner (FlowerBanner) and the libraries' deprecation warnings
    (LibraryWarnings, warnings routed through logging) kept out of it unless verbose.
    `log_file`: also write everything there, warnings included. Idempotent."""
    if not _is_tty():  # Hugging Face's own bars ("Loading weights") arrive as fragments in a log
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.captureWarnings(True)
    flwr = logging.getLogger("flwr")
    if not any(isinstance(f, FlowerBanner) for f in flwr.filters):
        flwr.addFilter(FlowerBanner())
    if log.level == logging.NOTSET or log.level > logging.INFO:
        log.setLevel(logging.INFO)
    consoles = [h for h in flwr.handlers if not isinstance(h, logging.FileHandler)]  # Flower's ConsoleHandler
    console = consoles[0] if consoles else None
    if not log.handlers and not logging.getLogger().handlers:
        console = console or logging.StreamHandler()
        log.addHandler(console)
    py_warnings = logging.getLogger("py.warnings")
    if console is not None:
        if not any(isinstance(f, LibraryWarnings) for f in console.filters):
            console.addFilter(LibraryWarnings())
        if console not in py_warnings.handlers:
            py_warnings.addHandler(console)
        py_warnings.propagate = False
    if log_file is not None:
        path = Path(log_file).resolve()
        for logger in (log, flwr, py_warnings):
            if not any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path for h in logger.handlers):
                path.parent.mkdir(parents=True, exist_ok=True)
                handler = logging.FileHandler(path)
                handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
                logger.addHandler(handler)
    while _held:  # through logging.captureWarnings: the log file keeps them, the console filters them
        held = _held.pop(0)
        warnings.showwarning(held.message, held.category, held.filename, held.lineno)
    files = [h for h in log.handlers if isinstance(h, logging.FileHandler)]
    while _held_records:  # the libraries' import-time log lines: the log file only
        record = _held_records.pop(0)
        for handler in files:
            handler.handle(record)


class _WithoutTraceback(logging.Filter):
    """Drops the traceback from the records that carry one exception (its message stays)."""

    def __init__(self, err: BaseException):
        super().__init__()
        self.err = err

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is self.err:
            record.exc_info, record.exc_text = None, None
        return True


def without_traceback(err: BaseException) -> None:
    """Flower logs an exception that ends a ServerApp with its traceback; for an error
    that is the user's to fix and already said in one line (a bad value, a failed site,
    nothing kept), the line is enough: Flower's record of `err` keeps only its message."""
    logging.getLogger("flwr").addFilter(_WithoutTraceback(err))


def status(message: str, *args) -> None:
    log.info(message, *args)


def seconds(value: float) -> str:
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"


class _Lines:
    """tqdm's interface (iterate, update, close, with) printing a line every `interval`
    seconds instead of a bar: for logs and pipes, where bars arrive as fragments."""

    def __init__(self, iterable=None, total=None, desc="", interval=30.0):
        self.iterable = iterable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.desc = desc or "progress"
        self.n = 0
        self.start = self.last = time.time()
        self.interval = interval
        self.printed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.time()
        if now - self.last >= self.interval:
            self.last = now
            self._line(now)

    def _line(self, now: float) -> None:
        of = f"/{self.total}" if self.total else ""
        print(f"{self.desc}: {self.n}{of} ({seconds(now - self.start)})", file=sys.stderr, flush=True)
        self.printed = True

    def close(self) -> None:
        if self.printed and self.total and self.n >= self.total:
            self.printed = False
            self._line(time.time())

    def set_postfix(self, *args, **kwargs) -> None:
        pass


def progress(iterable=None, *, total=None, desc="", leave=False, disable=False, **kwargs):
    """tqdm on a terminal; elsewhere a line every CLUES_FL_PROGRESS_SECONDS."""
    if disable:
        return iterable if iterable is not None else _Lines(None, total, desc, interval=float("inf"))
    if _is_tty():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, leave=leave, **kwargs)
    return _Lines(iterable, total, desc, interval=float(os.environ.get(PROGRESS_ENV, "30")))


@contextlib.contextmanager
def library_progress(module):
    """A library's own tqdm bars (`module.tqdm`, e.g. transformers' GGUF conversion) as
    `progress` lines while in the block: off a terminal a bar's carriage returns would
    land in the log as fragments."""
    if _is_tty() or not hasattr(module, "tqdm"):
        yield
        return
    original = module.tqdm

    def lines(iterable=None, *args, desc="", total=None, **kwargs):
        return progress(iterable, total=total, desc=desc or kwargs.get("unit", ""))

    module.tqdm = lines
    try:
        yield
    finally:
        module.tqdm = original


def _is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
