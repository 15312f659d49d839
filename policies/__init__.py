"""Declarative sandbox and access policies, shipped as package data (`*.toml` beside this file)."""
