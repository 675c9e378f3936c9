"""Every `hindsight` command: one module each, registered here by one line.

A command module holds one `Command` subclass (its options, `run`, `report`); see
jobs/command.py. Modules are imported when the command line is built, so they import
heavy libraries (torch, gymnasium) inside `run`, not at the top.
"""

from __future__ import annotations

import importlib

# name -> "module:Class", in the order `hindsight --help` lists them.
COMMANDS: dict[str, str] = {
    "collect": "jobs.commands.collect:Collect",
    "ingest": "jobs.commands.ingest:Ingest",
    "info": "jobs.commands.info:Info",
    "materialize": "jobs.commands.materialize:Materialize",
    "relabel": "jobs.commands.relabel:Relabel",
    "relabelers": "jobs.commands.relabelers:Relabelers",
    "query": "jobs.commands.query:Query",
    "view": "jobs.commands.view:View",
    "shard": "jobs.commands.shard:Shard",
    "export": "jobs.commands.export:Export",
    "train": "jobs.commands.train:Train",
    "ask": "jobs.commands.ask:Ask",
    "demo": "jobs.commands.demo:Demo",
    "run": "jobs.commands.run:RunSpec",
    "submit": "jobs.commands.submit:Submit",
    "jobs": "jobs.commands.cluster_jobs:Jobs",
}


def command_class(name: str):
    """The Command subclass registered under `name`."""
    module_name, _, class_name = COMMANDS[name].partition(":")
    return getattr(importlib.import_module(module_name), class_name)
