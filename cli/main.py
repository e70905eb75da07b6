"""The `onnxfair` command: a click group whose commands live in one module each."""

from __future__ import annotations

import sys

import click

from onnxfair import __version__
from onnxfair.errors import OnnxfairError


class _Group(click.Group):
    """Turns every OnnxfairError, and click's own usage errors, into one line on stderr and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "onnxfair"
            click.echo(f"error: {exc.format_message()} (see '{where} --help')", err=True)
            sys.exit(exc.exit_code)
        except OnnxfairError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing was written", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnxfair")
def app() -> None:
    """Compress ONNX classifiers without making them unfair."""


def _register() -> None:
    from cli import evaluate, inspect, prune, risk, sweep

    for module in (evaluate, inspect, prune, risk, sweep):
        for command in module.COMMANDS:
            app.add_command(command)


_register()


def main() -> None:
    app(prog_name="onnxfair")


if __name__ == "__main__":
    main()
