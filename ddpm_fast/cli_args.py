"""Argument parsing shared by every `ddpm-fast` command (cli.py) and the benchmark (bench.py):
errors on one line with exit status 2, typed counts, and flags whose old spellings still work for
one release with a notice. Nothing here imports the rest of the package, so both import it.

One name per meaning, the same in every command (README "Command-line flags" has the table, and
tests/test_cli.py checks it against every command's --help)."""
from __future__ import annotations

import argparse
import sys


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage dump), exit status 2."""

    def error(self, message):
        self.exit(2, f"ddpm-fast: error: {message}\n")


def _int_at_least(low: int, not_int: str, too_small: str):
    """An argparse type maker: an integer ≥ low, or a one-line error naming the flag (the
    messages are formats of name and the text or value)."""
    def make(name: str):
        def parse(text):
            try:
                value = int(text)
            except ValueError:
                raise argparse.ArgumentTypeError(not_int.format(name=name, got=repr(text)))
            if value < low:
                raise argparse.ArgumentTypeError(too_small.format(name=name, got=value))
            return value
        return parse
    return make


# an integer ≥ 1 (counts, sizes); an integer ≥ 0 (--seed)
positive = _int_at_least(1, "{name} must be a positive integer, got {got}",
                         "{name} must be a positive integer, got {got}")
non_negative = _int_at_least(0, "{name} must be an integer, got {got}",
                             "{name} must be non-negative, got {got}")


def batch_size_arg(text):
    """--batch-size: a positive integer, or "auto" (the largest that fits in memory)."""
    return "auto" if text == "auto" else positive("--batch-size")(text)


class DeprecatedFlag(argparse.Action):
    """An old spelling that still works, with a one-line notice on stderr naming the new one."""

    def __init__(self, option_strings, dest, new: str = "", **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"ddpm-fast: note: {option_string} is deprecated, use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_flag(q, flag: str, *, old=(), **kwargs) -> argparse.Action:
    """Option `flag` (add_argument's keywords), plus its `old` spellings: hidden, parsed the
    same way into the same attribute, each with a deprecation notice."""
    action = q.add_argument(flag, **kwargs)
    for spelling in old:
        q.add_argument(spelling, dest=action.dest, type=action.type, choices=action.choices,
                       nargs=action.nargs, action=DeprecatedFlag, new=flag,
                       help=argparse.SUPPRESS)
    return action


def add_count(q, flag: str, dest: str, default: int, help_text: str, old: str = "--num"):
    """A positive count: --num-images (images a command outputs) or --num-data (held-out data)."""
    add_flag(q, flag, old=(old,), dest=dest, type=positive(flag), default=default, metavar="N",
             help=help_text)


DEVICE_HELP = "cpu, cuda, cuda:N or auto (default: cuda when a GPU is visible, else cpu)"


def add_device(q) -> None:
    """--device, the same in every command (commands.resolve_device reads it)."""
    q.add_argument("--device", default="auto", help=DEVICE_HELP)


def add_seed(q, help_text: str = "Philox key: image i depends on (seed, i)") -> None:
    """--seed: a non-negative integer, 0 by default."""
    q.add_argument("--seed", type=non_negative("--seed"), default=0, help=help_text)
