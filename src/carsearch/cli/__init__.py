"""The `carsearch` command: a thin click layer, one module per stage with its human formatter, no logic.

Heavy libraries (torch, faiss, fastapi) are imported inside the commands, so `carsearch --help` is instant.
"""

from __future__ import annotations

import click

from carsearch import __version__
from carsearch.cli.audit import audit
from carsearch.cli.bench import bench
from carsearch.cli.common import CONTEXT, Group, load_config_option, setup_logging
from carsearch.cli.embed import backbones, dataset, embed, project
from carsearch.cli.index import index
from carsearch.cli.search import classify, search
from carsearch.cli.serve import serve
from carsearch.cli.train import train


@click.group(cls=Group, context_settings=CONTEXT)
@click.version_option(__version__, "--version", prog_name="carsearch")
@click.option(
    "--config",
    type=click.Path(dir_okay=False),
    callback=load_config_option,
    is_eager=True,
    expose_value=False,
    help="TOML settings file (see configs/); flags and CARSEARCH_* variables override it.",
)
@click.option("-v", "--verbose", count=True, help="More log output.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr.")
def cli(verbose: int, quiet: bool) -> None:
    """Reverse image search and open-set classification for car photos.

    \b
    Stages, each reading and writing files:
      carsearch embed DATA_DIR --out EMB_DIR        images -> HDF5 embedding shards
      carsearch index build EMB_DIR --out INDEX     shards -> faiss index
      carsearch search --index INDEX photo.jpg      most similar cars
      carsearch classify --index INDEX photo.jpg    make/model/year by kNN vote, or "unknown"
    """
    setup_logging(verbose, quiet)


for _command in (embed, project, backbones, dataset, index, search, classify, bench, audit, serve, train):
    cli.add_command(_command)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="carsearch")
