"""Adapters to training frameworks (TRL). Each submodule imports its framework lazily."""
