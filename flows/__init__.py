"""Orchestration only: the stage registry, the CLI, Prefect flows."""
