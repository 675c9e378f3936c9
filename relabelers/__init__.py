"""Relabelers: attach hindsight conditioning columns to whole episodes.

`ls relabelers/` is the list of built-ins: returns, goals, skill, drex, language (a package:
facts, prompt, describers), embed; `llm.py` is the client both LLM relabelers share. The
contract is in `relabelers/base.py` (docs/plugins.md), discovery in `relabelers/registry.py`.
"""
