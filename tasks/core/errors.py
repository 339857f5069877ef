"""One error family for the whole project, so the CLI can turn any known failure into one `error:` line.

`InputError` (exit 2): the user's params, files or arguments are wrong; fixing them fixes the run.
`RunError` (exit 1): the inputs were fine but the work failed (a server down, too many failed downloads).
Messages name the file / key / id and say what to do next.
"""

from __future__ import annotations


class LesionflowError(Exception):
    """Base of every error lesionflow raises on purpose; `exit_code` is what the CLI returns."""

    exit_code = 1


class InputError(LesionflowError, ValueError):
    """Bad input: params, data files, images or command-line arguments (exit 2)."""

    exit_code = 2


class RunError(LesionflowError, RuntimeError):
    """A runtime failure with valid inputs: network, a stage's failure budget, a missing upstream output (exit 1)."""

    exit_code = 1
