"""The stage registry: dvc.yaml order, the params section each reads, and orchestration tags."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Stage:
    name: str  # = dvc.yaml stage = params.yaml section = tasks/<name>.py = Prefect task name
    tags: tuple[str, ...] = ()

    @property
    def module(self) -> str:
        return f"tasks.{self.name}"

    def load(self) -> Callable[..., Any]:
        """The stage's `run(params, paths)`; imported lazily so no stage pays for another's imports."""
        return importlib.import_module(self.module).run


# dvc.yaml order. A test fails if dvc.yaml and this list disagree.
STAGES: dict[str, Stage] = {
    s.name: s
    for s in [
        Stage("ingest", tags=("network",)),
        Stage("dedupe"),
        Stage("clean"),
        Stage("split"),
        Stage("preprocess"),
        Stage("augment"),
        Stage("cyclegan", tags=("gpu",)),
        Stage("upsample"),
        Stage("train", tags=("gpu",)),
        Stage("evaluate", tags=("gpu",)),
        Stage("ugly_duckling"),
    ]
}


def get(name: str) -> Stage:
    try:
        return STAGES[name]
    except KeyError:
        raise SystemExit(f"unknown stage {name!r}; stages: {', '.join(STAGES)}") from None
