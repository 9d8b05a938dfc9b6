"""`headstart backbones`: the built-in backbones and whether their weights are available offline."""

from headstart.cli import render
from headstart.cli.base import app


@app.command()
def backbones() -> None:
    """List the built-in backbones and whether their weights are available offline."""
    from headstart.backbones.registry import DEFAULT_BACKBONE as default
    from headstart.backbones.registry import REGISTRY, available_offline

    specs = list(REGISTRY.values())
    console = render.out_console()
    console.print(render.backbones_table(specs, [available_offline(s) for s in specs], default, console.width))
