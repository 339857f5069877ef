"""`lesionflow card MODEL_URI`: print the model card of a registered version or an evaluate run.

MODEL_URI: models:/lesionflow-classifier@champion, models:/lesionflow-classifier/3 or runs:/<run id>. The card
is the `model_card.md` the evaluate stage attached to the run (tasks/core/card.py builds it); a version
registered without one falls back to the version's description.
"""

from __future__ import annotations

from pathlib import Path

from tasks.core.errors import InputError


def card(model_uri: str, root: Path | str = ".") -> str:
    """The card's markdown; InputError (exit 2) when the URI is malformed, unknown or has no card."""
    from tasks import tracking  # mlflow: heavy

    if not model_uri.startswith(("models:/", "runs:/")):
        raise InputError(f"{model_uri}: expected models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID "
                         "(e.g. models:/lesionflow-classifier@champion)")
    try:
        return tracking.read_card(model_uri, Path(root).resolve())
    except LookupError as exc:
        raise InputError(f"{exc}; list versions with `lesionflow ui`") from None
