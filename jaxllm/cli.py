"""The `jaxllm` console script: `jaxllm serve [MODEL] [flags]` (same flags as `python -m jaxllm.serve`) and
`jaxllm run-batch -i INPUT -o OUTPUT [MODEL] [flags]` (`python -m jaxllm.run_batch`)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: jaxllm serve [MODEL] [flags] | jaxllm run-batch -i INPUT -o OUTPUT [MODEL] [flags]   "
              "(--help after the command for its flags)")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "serve":
        from jaxllm.serve import build_parser, main as serve_main
        if rest[:1] in (["-h"], ["--help"]):
            build_parser("jaxllm serve").print_help()
            return 0
        return serve_main(rest)
    if command == "run-batch":
        from jaxllm.run_batch import build_parser as batch_parser, main as batch_main
        if rest[:1] in (["-h"], ["--help"]):
            batch_parser("jaxllm run-batch").print_help()
            return 0
        return batch_main(rest)
    print(f"jaxllm: unknown command {command!r} (known: serve, run-batch)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
