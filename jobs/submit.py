"""Placeholder: commands are added by the issue that owns this module."""

from __future__ import annotations


def add_commands(subparsers) -> None:
    return None
