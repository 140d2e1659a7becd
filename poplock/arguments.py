"""Command-line parsing shared by poplock's programs: usage errors exit with os.EX_USAGE (64)."""

import argparse
import os
import sys


class ArgumentParser(argparse.ArgumentParser):
    """argparse with poplock's usage exit status, and --version on every program's top parser."""

    def __init__(self, *arguments, **keywords):
        super().__init__(*arguments, **keywords)
        if keywords.get("add_help", True) and "prog" in keywords:
            from poplock import __version__

            self.add_argument("--version", action="version", version=f"%(prog)s {__version__}")

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(os.EX_USAGE, f"{self.prog}: error: {message}\n")


def join_dash_values(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """`--since -1h` as `--since=-1h`: argparse would take a value that starts with '-' for an option."""
    joined: list[str] = []
    index = 0
    while index < len(argv):
        word = argv[index]
        following = argv[index + 1] if index + 1 < len(argv) else ""
        if word in options and following.startswith("-") and following[1:2].isdigit():
            joined.append(f"{word}={argv[index + 1]}")
            index += 2
            continue
        joined.append(word)
        index += 1
    return joined
