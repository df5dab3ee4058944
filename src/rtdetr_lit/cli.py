"""One-line errors for the command-line entry points.

A mistake a user can fix from the command line is reported as one line on stderr, without a Python
traceback, with exit code 2 (as argparse does):

* a required value that was not given (``ckpt_path``, ``source``, ``data.root`` of
  ``data=custom``), with an example command (:func:`rtdetr_lit.config.check_required`);
* a :class:`~rtdetr_lit.config.ConfigError` raised by a task;
* a misspelt key on the command line (``trainer.max_epoch=3``: did you mean trainer.max_epochs?)
  or a misspelt group option (``model=r05``: did you mean model=r50?).

With ``HYDRA_FULL_ERROR=1`` every exception propagates with its traceback, as Hydra does.

:func:`hydra_main` replaces ``@hydra.main`` for the entry points. Hydra catches a task's exception
and prints a traceback, so in a single run the task's error becomes a ``SystemExit`` (which Hydra
lets through). In a multirun it stays an exception, so that a sweeper (Optuna) counts the trial as
failed and goes on. Errors of composition (before any task runs) and whatever reaches Hydra's own
report at the end go through :func:`error_message` while the entry point runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

from omegaconf import DictConfig
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

from rtdetr_lit.config import (
    CONFIG_DIR,
    ConfigError,
    check_required,
    did_you_mean,
    missing_keys,
    required_message,
    suggest,
)

__all__ = ["error_message", "fail", "full_error", "hydra_main"]

T = TypeVar("T")
Task = Callable[[DictConfig], T]

# Errors of a task that mean "fix the command or the config", not a bug.
_USER_ERRORS = (ConfigError, MissingMandatoryValue, InterpolationToMissingValueError)

_reporting = False  # True while an entry point runs from the command line


def full_error() -> bool:
    """``HYDRA_FULL_ERROR=1``: let every exception through with its traceback."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def fail(message: str) -> NoReturn:
    """Print ``message`` on stderr and exit with code 2."""
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(2)


def hydra_main(config_name: str) -> Callable[[Task[T]], Callable[..., T | None]]:
    """``@hydra.main`` on ``conf/<config_name>.yaml`` with one-line errors (module docstring).

    The decorated function is the entry point: ``main()`` reads ``sys.argv`` as Hydra does, and
    ``main(cfg)`` runs the task on a composed config with its exceptions unchanged. The task's
    return value (the optimised metric of ``train``) reaches Hydra's sweepers as before.
    """
    import hydra

    def decorate(task: Task[T]) -> Callable[..., T | None]:
        @functools.wraps(task)  # Hydra unwraps it: the job name stays the entry module's
        def run_task(cfg: DictConfig) -> T:
            try:
                check_required(cfg)
                return task(cfg)
            except Exception as err:
                user_error = _user_error(err)
                if user_error is None or not _reporting or full_error() or _multirun():
                    raise
                fail(error_message(user_error, cfg) or str(user_error))

        hydra_entry = hydra.main(
            version_base="1.3", config_path=str(CONFIG_DIR), config_name=config_name
        )(run_task)

        @functools.wraps(task)
        def main(cfg: DictConfig | None = None) -> T | None:
            if cfg is not None:
                return hydra_entry(cfg)
            with _one_line_reports():
                return hydra_entry()

        return main

    return decorate


def _user_error(err: BaseException) -> BaseException | None:
    """``err`` if it is the user's to fix (:data:`_USER_ERRORS`), also when Hydra's
    ``instantiate`` wrapped it (a constructor that refused a setting); else ``None``."""
    from hydra.errors import InstantiationException

    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    return err if isinstance(err, _USER_ERRORS) else None


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@contextlib.contextmanager
def _one_line_reports() -> Iterator[None]:
    """While an entry point runs: Hydra reports the errors :func:`error_message` knows in one line
    (exit code 2), every other one as before. Hydra calls ``run_and_report`` of its
    ``_internal.utils`` module around composing the config and running the jobs; it is replaced for
    this call only (left alone if a Hydra release no longer has it)."""
    global _reporting
    from hydra._internal import utils as hydra_utils

    original = getattr(hydra_utils, "run_and_report", None)

    def run_and_report(func: Callable[[], Any]) -> Any:
        if full_error():
            return original(func)
        try:
            return func()
        except Exception as err:
            message = error_message(err)
            if message is None:  # Hydra's own report, its traceback trimmed as before
                return original(functools.partial(_raise, err))
            fail(message)

    previous = _reporting
    _reporting = True
    if original is not None:
        hydra_utils.run_and_report = run_and_report
    try:
        yield
    finally:
        _reporting = previous
        if original is not None:
            hydra_utils.run_and_report = original


def _raise(err: BaseException) -> NoReturn:
    raise err


def error_message(err: BaseException, cfg: DictConfig | None = None) -> str | None:
    """The one line that reports ``err`` to a user, or ``None`` for an error that is not theirs
    to fix from the command line (reported with its traceback)."""
    from hydra.errors import ConfigCompositionException, MissingConfigException

    if isinstance(err, ConfigError):
        return str(err)
    if isinstance(err, (MissingMandatoryValue, InterpolationToMissingValueError)):
        keys = missing_keys(cfg) if cfg is not None else []
        if not keys and isinstance(err, MissingMandatoryValue) and err.full_key:
            keys = [err.full_key]
        if keys:
            return required_message(keys, cfg)
        return str(err).splitlines()[0]
    if isinstance(err, MissingConfigException):
        return _missing_option_message(err)
    if isinstance(err, ConfigCompositionException):
        return _unknown_key_message(err)
    return None


_OVERRIDE = re.compile(r"Could not override '([^']+)'\.\nTo append to your config use \+(.+)")


def _unknown_key_message(err: Exception) -> str | None:
    """``trainer.max_epoch=3``: ``Could not override 'trainer.max_epoch': trainer has no key
    'max_epoch', did you mean trainer.max_epochs?``"""
    match = _OVERRIDE.match(str(err))
    if match is None:
        return _schema_key_message(str(err))
    cause = err.__cause__
    parent = getattr(cause, "parent_node", None)
    key, full_key = getattr(cause, "key", None), getattr(cause, "full_key", None)
    if not (isinstance(parent, DictConfig) and isinstance(key, str) and full_key):
        return None
    node = full_key[: -len(key)].rstrip(".") if full_key.endswith(key) else ""
    close = suggest(key, [k for k in parent if isinstance(k, str)])
    hint = did_you_mean(f"{node}.{c}".lstrip(".") for c in close) if close else ""
    override, line = match.groups()
    text = f"Could not override '{override}': {node or 'the config'} has no key '{key}'"
    return f"{text}, {hint}" if hint else f"{text}; to add it use +{line}"


_SCHEMA_KEY = re.compile(
    r"(In '[^']+'): ConfigKeyError raised while composing config:\n"
    r"Key '([^']+)' not in '(\w+)'\n\s*full_key: (\S+)"
)


def _schema_key_message(text: str) -> str | None:
    """A misspelt key in a config file, under a schema of :mod:`rtdetr_lit.config`: ``In
    'experiment/mine': Key 'seeed' not in 'TrainSchema', did you mean seed?``"""
    from rtdetr_lit import config

    match = _SCHEMA_KEY.match(text)
    schema = getattr(config, match.group(3), None) if match else None
    if not (match and dataclasses.is_dataclass(schema)):
        return None
    where, key, name, full_key = match.groups()
    node = full_key[: -len(key)].rstrip(".") if full_key.endswith(key) else ""
    close = suggest(key, [f.name for f in dataclasses.fields(schema)])
    if not close:
        return None
    return f"{where}: Key '{key}' not in '{name}', " + did_you_mean(
        f"{node}.{c}".lstrip(".") for c in close
    )


def _missing_option_message(err: Exception) -> str | None:
    """``model=r05``: ``In 'train': Could not find 'model/r05', did you mean model=r50? Options in
    'model': demo, r101, r18, r34, r50, r50m``"""
    missing = getattr(err, "missing_cfg_file", None) or ""
    options = [o for o in getattr(err, "options", None) or [] if not o.startswith("_")]
    group, _, name = missing.rpartition("/")
    if not (group and options):
        return None
    first = str(err).splitlines()[0].rstrip()
    close = suggest(name, options)
    hint = f", {did_you_mean(f'{group}={c}' for c in close)}" if close else "."
    return f"{first}{hint} Options in '{group}': {', '.join(options)}"
