"""Warnings: importing clues-fl changes no warning filter; a run's console drops the
libraries' FutureWarnings and DeprecationWarnings (unless verbose), its log file keeps them."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import warnings

from clues_fl import console


def test_importing_the_package_silences_no_warning_category():
    code = ("import warnings; before = list(warnings.filters); "
            "import clues_fl, clues_fl.config, clues_fl.client_app, clues_fl.server_app; "
            "blanket = [f for f in warnings.filters if f not in before and f[0] == 'ignore' and f[1] is None "
            "and f[3] is None and f[2] in (FutureWarning, DeprecationWarning, Warning)]; assert not blanket, blanket")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_the_apps_import_warnings_wait_for_the_runs_log(tmp_path):
    """peft imports bitsandbytes, which calls torch.compile, which warns: in every site's
    process, before a run's console exists. The apps hold such warnings for the log."""
    log_file = tmp_path / "site.log"
    code = ("import warnings; warnings.simplefilter('default'); "
            "import clues_fl.client_app, clues_fl.server_app; from clues_fl import console; "
            f"console._held.append(warnings.WarningMessage('held_api is deprecated', DeprecationWarning, 'x.py', 1)); "
            "import logging\nwith console.held_warnings(): logging.getLogger('somelib').warning('no optional kernel')\n"
            f"console.setup({str(log_file)!r})")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert "Warning" not in done.stderr and "kernel" not in done.stderr, done.stderr
    assert "held_api is deprecated" in log_file.read_text()
    assert "somelib: no optional kernel" in log_file.read_text()  # a library's log line at import: the file only


def test_a_runs_console_drops_library_deprecations_and_its_log_keeps_them(tmp_path, monkeypatch):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    screen = io.StringIO()
    flower_console = logging.StreamHandler(screen)  # what Flower's ConsoleHandler is in a run
    flwr, py_warnings = logging.getLogger("flwr"), logging.getLogger("py.warnings")
    monkeypatch.setattr(flwr, "handlers", [flower_console])
    monkeypatch.setattr(py_warnings, "handlers", [])
    monkeypatch.setattr(py_warnings, "propagate", True)
    log_file = tmp_path / "run.log"
    console.setup(log_file)
    with warnings.catch_warnings():  # pytest records warnings itself: let these reach logging
        warnings.simplefilter("always")
        warnings.warn("old_api is deprecated", FutureWarning, stacklevel=1)
        warnings.warn("the data has 3 empty rows", UserWarning, stacklevel=1)
        monkeypatch.setenv(console.VERBOSE_ENV, "1")
        warnings.warn("another_api is deprecated", DeprecationWarning, stacklevel=1)
    for handler in py_warnings.handlers:
        handler.flush()
    text, shown = log_file.read_text(), screen.getvalue()
    assert all(m in text for m in ("old_api is deprecated", "3 empty rows", "another_api"))  # the log keeps all
    assert "old_api" not in shown  # the console drops the library's deprecation
    assert "3 empty rows" in shown and "another_api" in shown  # shows the rest, and all of it when verbose
