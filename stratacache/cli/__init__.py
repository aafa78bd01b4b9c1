"""The ``stratacache`` command line: serve, demo, bench, inspect and config.

Each subcommand lives in its own module exposing ``add_parser(subparsers)``
and ``run(args) -> int``; ``main.py`` only dispatches and turns failures into
one-line messages. Heavy imports (torch, vLLM) happen inside the commands so
``--help`` and usage errors stay instant.
"""
