"""The apps score with the tiny trained model of tests/tasks/conftest.py."""

from tests.tasks.conftest import lf_tiny_params, lf_trained  # noqa: F401 - fixtures shared with tests/tasks
