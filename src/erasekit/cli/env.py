"""``erasekit env``: versions, hardware and what is available, for bug reports and run records."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("env", help="print versions, hardware and registered methods")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run_env)


def run_env(args: argparse.Namespace) -> int:
    from erasekit import __version__
    from erasekit.provenance import git_commit, hardware, package_versions
    from erasekit.registry import list_methods

    try:
        from erasekit.minicanvas import weights_dir

        minicanvas = str(weights_dir())
    except Exception as e:  # reported, not raised: env must work on a broken install
        minicanvas = f"unavailable ({e})"
    info = {
        "erasekit": __version__,
        "git_commit": git_commit(),
        "packages": package_versions(),
        "hardware": hardware(),
        "methods": list_methods(),
        "minicanvas": minicanvas,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        elif isinstance(value, list):
            value = ", ".join(value)
        print(f"{key:<11} {value}")
    return 0
