"""CLI subcommands: each module defines ``add_parser(subparsers) -> name`` and ``run(args)``."""
