"""The `jaxllm` console script: `jaxllm serve [MODEL] [flags]` (same flags as `python -m jaxllm.serve`)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: jaxllm serve [MODEL] [flags]   (jaxllm serve --help for the flags)")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "serve":
        from jaxllm.serve import build_parser, main as serve_main
        if rest[:1] in (["-h"], ["--help"]):
            build_parser("jaxllm serve").print_help()
            return 0
        return serve_main(rest)
    print(f"jaxllm: unknown command {command!r} (known: serve)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
