"""Relabelers: attach hindsight conditioning columns to whole episodes.

`ls relabelers/` is the list of built-ins: returns, goals, skill, drex, language, embed.
The contract is in `relabelers/base.py`, discovery in `relabelers/registry.py`.
"""
