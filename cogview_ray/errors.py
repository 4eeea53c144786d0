"""Errors a user can cause or must act on: one sentence each, and the exit code the command line
returns for them (cli.py prints them without a traceback). Imports nothing, so any layer may use it."""
from __future__ import annotations


class UserError(Exception):
    """Something the user must fix or decide; the message is one sentence naming what."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A setting the user got wrong; the message names the key (never a secret's value)."""


class DatasetError(UserError, ValueError):
    """Input the user must fix; the message names the file, column or uri."""


class RunRefused(UserError):
    """The run will not start as asked, e.g. a resume whose output-defining settings changed."""


class RunError(UserError):
    """The run cannot start or cannot go on (no worker could load, workers keep dying)."""


class ReportError(UserError):
    """The report cannot be made; the message says why in one sentence."""


class RunLocked(UserError):
    """Another driver holds the run's lock; nothing was written."""

    exit_code = 3


class LockLost(UserError):
    """This driver no longer holds the run's lock (another took it over); it writes nothing more."""

    exit_code = 3


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name if empty), at most `limit` chars:
    enough to say what went wrong in a log line or a manifest reason, never a whole traceback."""
    lines = str(exc).strip().splitlines()
    return lines[0][:limit] if lines else type(exc).__name__
