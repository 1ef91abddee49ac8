"""Shared helpers: scenarios small enough for 2 CPU cores, and one CLI entry point."""

from __future__ import annotations

import sys

import pytest

from fedtide.cli import main
from fedtide.data.loading import parse_scenario


def small_scenario(**sections):
    """A digits scenario of 3 experiences, 4 Dirichlet clients and 2 rounds each, overridable."""
    raw = {
        "name": "small",
        "seed": 0,
        "stream": {"n_experiences": 3},
        "partition": {"kind": "dirichlet", "alpha": 0.5, "num_clients": 4},
        "federation": {"rounds_per_experience": 2},
        "continual": {"method": "replay", "mem_size": 60},
    }
    raw.update(sections)
    return parse_scenario(raw)


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """Run `fedtide ARGS...` in-process; return (exit code, stdout, stderr)."""

    def invoke(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["fedtide", *args])
        code = 0
        try:
            main()
        except SystemExit as done:
            code = done.code or 0
        out, err = capsys.readouterr()
        return code, out, err

    return invoke
