"""Versioned prompt templates of the language relabeler (package data)."""
