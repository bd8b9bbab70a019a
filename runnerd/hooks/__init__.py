"""Hooks on run events: `[[hooks]]` commands run with each event they want, at least once
and in order per run, from a cursor kept beside the registry (see runner.py)."""

from __future__ import annotations

from runnerd.hooks.runner import HookRunner

__all__ = ["HookRunner"]
