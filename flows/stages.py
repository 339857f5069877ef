"""The stage registry: dvc.yaml order, the params sections each stage reads, and orchestration tags."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tasks.core.errors import InputError


@dataclass(frozen=True)
class Stage:
    name: str  # = dvc.yaml stage = params.yaml section = tasks/<name>.py = Prefect task name
    tags: tuple[str, ...] = ()
    sections: tuple[str, ...] = ()  # params sections it reads after its own; = dvc.yaml `params:` (tested)

    @property
    def module(self) -> str:
        return f"tasks.{self.name}"

    @property
    def params(self) -> tuple[str, ...]:
        """Every params section the stage may read, its own first (dvc.yaml `params:` in this order)."""
        return (self.name, *self.sections)

    def load(self) -> Callable[..., Any]:
        """The stage's `run(params, paths)`; imported lazily so no stage pays for another's imports."""
        return importlib.import_module(self.module).run

    def run(self, params: Any, paths: Any) -> dict[str, Any]:
        """Run the stage on only its declared params sections (a view: other sections raise ParamsError)."""
        view = params.view(self.params, self.name) if hasattr(params, "view") else params
        return self.load()(view, paths) or {}


# dvc.yaml order. A test fails if dvc.yaml and this list disagree.
STAGES: dict[str, Stage] = {
    s.name: s
    for s in [
        Stage("ingest", tags=("network",)),
        Stage("dedupe"),
        Stage("clean"),
        Stage("split"),
        Stage("preprocess"),
        Stage("augment", sections=("preprocess",)),
        Stage("cyclegan", tags=("gpu",)),
        Stage("upsample"),
        Stage("train", sections=("augment", "preprocess"), tags=("gpu",)),
        Stage("evaluate", tags=("gpu",)),
        Stage("ugly_duckling"),
    ]
}


def get(name: str) -> Stage:
    """The stage called `name`, or an input error listing the stages."""
    try:
        return STAGES[name]
    except KeyError:
        raise InputError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}") from None
