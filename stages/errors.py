import sys
from collections.abc import Callable


class UsageError(Exception):
    """Bad input from the user (a recipe, a flag, a path): reported as one line, exit code 2."""


def run_cli(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Run a stage's `main`, turning a `UsageError` into a one-line message and exit code 2."""
    try:
        main(argv)
    except UsageError as error:
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        prog = f"python -m {spec.name.removesuffix('.__main__')}" if spec else "error"
        print(f"{prog}: error: {error}", file=sys.stderr)
        sys.exit(2)

