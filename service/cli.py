"""The `horen` command: `horen eval ...` (horen_core), `horen serve` (the HTTP service) and
`horen import FILE` (a bulk import into a running service)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: horen {eval,serve,import} ...\n  eval    sequential-editing evaluation\n"
            "  serve   run the HTTP service\n  import  send a JSONL file of facts to a running service"
        )
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "eval":
        from horen_core.cli import eval_main

        return eval_main(rest)
    if cmd == "serve":
        from service.server import serve_main

        return serve_main(rest)
    if cmd == "import":
        from service.import_cli import import_main

        return import_main(rest)
    print(f"horen: unknown command {cmd!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
