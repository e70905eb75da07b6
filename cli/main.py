"""The `onnxfair` command: a click group whose commands live in one module each."""

from __future__ import annotations

import signal
import sys

import click

from onnxfair import __version__
from onnxfair.errors import OnnxfairError


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is so that cleanup (`finally`, temporary files) runs as on Ctrl-C."""


def _interrupted_message() -> str:
    from onnxfair.model import WRITTEN

    if not WRITTEN:
        return "nothing was written"
    return f"wrote {', '.join(str(p) for p in WRITTEN)} before stopping; the rest was not written"


class _Group(click.Group):
    """Turns every OnnxfairError, and click's own usage errors, into one line on stderr and exit code 2.

    The commands are imported on first use (they import torch, which takes seconds), inside `invoke`, so a
    Ctrl-C during that import ends with the same one line as any other."""

    def _load(self) -> None:
        if not self.commands:
            from cli import evaluate, inspect, prune, risk, sweep

            for module in (evaluate, inspect, prune, risk, sweep):
                for command in module.COMMANDS:
                    self.add_command(command)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, name: str):
        self._load()
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context):
        from onnxfair.model import WRITTEN

        WRITTEN.clear()  # one command per process from the shell; tests invoke many in one
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "onnxfair"
            click.echo(f"error: {exc.format_message()} (see '{where} --help')", err=True)
            sys.exit(exc.exit_code)
        except OnnxfairError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt as exc:
            stopped = "terminated" if isinstance(exc, Terminated) else "interrupted"
            click.echo(f"{stopped}; {_interrupted_message()}", err=True)
            sys.exit(143 if isinstance(exc, Terminated) else 130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnxfair")
def app() -> None:
    """Compress ONNX classifiers without making them unfair."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    app(prog_name="onnxfair")


if __name__ == "__main__":
    main()
