"""The ``mixtape`` command line: ``demo``, ``bench``, ``pack-stats``, ``info``, ``experiment``.

Each subcommand lives with the stage it drives (``mixtape.bench``, ``mixtape.packing``, ...);
this module only parses the first word and hands the rest over, so importing it stays cheap.
"""

from __future__ import annotations

import importlib
import json
import sys

# subcommand -> (module, function taking argv and returning an exit code, help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("mixtape.demo.run", "main", "train a tiny GPT-2 from a scheduled packed mixture"),
    "bench": ("mixtape.bench", "main", "side-by-side speed comparison against the usual peers"),
    "pack-stats": ("mixtape.packing", "stats_main", "packing statistics of a dataset or lengths"),
    "info": ("mixtape.cli", "info_main", "build information: compiler, flags, CUDA"),
    "experiment": ("mixtape.cli", "experiment_main", "experiments: 'experiment influence'"),
}

# experiment name -> (module, function taking argv and returning an exit code)
EXPERIMENTS: dict[str, tuple[str, str]] = {
    "influence": ("mixtape.influence.experiment", "main"),
}


def experiment_main(argv: list[str]) -> int:
    """``mixtape experiment NAME [ARGS]``: run one of :data:`EXPERIMENTS`."""
    if not argv or argv[0] not in EXPERIMENTS:
        asked = argv[:1] in (["-h"], ["--help"])
        print(f"usage: mixtape experiment {{{','.join(EXPERIMENTS)}}} [ARGS]",
              file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    module, func = EXPERIMENTS[argv[0]]
    result: int = getattr(importlib.import_module(module), func)(argv[1:])
    return result


def info_main(argv: list[str]) -> int:
    """Print :func:`mixtape.build_info` as JSON."""
    from mixtape.ops import build_info

    if argv:
        print(f"mixtape info takes no arguments, got {argv}", file=sys.stderr)
        return 2
    print(json.dumps(build_info(), indent=2))
    return 0


def _usage() -> str:
    lines = ["usage: mixtape COMMAND [ARGS]", "", "commands:"]
    lines += [f"  {name:<12} {helptext}" for name, (_, _, helptext) in COMMANDS.items()]
    lines += ["", "mixtape COMMAND --help shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mixtape`` console script."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"mixtape: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    result: int = getattr(importlib.import_module(module), func)(rest)
    return result


if __name__ == "__main__":
    sys.exit(main())
