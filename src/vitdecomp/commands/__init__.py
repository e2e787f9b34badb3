"""The command layer: every argparse parser and every ``run(args)``, one module per subcommand, and
the table of subcommands, :data:`COMMANDS`. Nothing below this package imports argparse; shared
options are declared once in :mod:`vitdecomp.commands.options`.

A subcommand is one row: its name, its one-line help and the function that fills its parser
(``configure(parser)``: its description and options, and ``func`` = its ``run(args)``), named as
``"module:function"`` so that only the chosen subcommand's module is imported (``vitdecomp --help``
and ``vitdecomp COMMAND --help`` do not import torch). To add a subcommand, add a module and a row.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """A subcommand: ``name``, one-line ``help`` and ``configure`` (``"module:function"`` or a callable
    that fills the subcommand's parser)."""

    name: str
    help: str
    configure: str | Callable[[argparse.ArgumentParser], object]

    def register(self, subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
        """Add this subcommand's parser, filled by ``configure``."""
        configure = self.configure
        if isinstance(configure, str):
            module, _, function = configure.partition(":")
            configure = getattr(importlib.import_module(module), function)
        parser = subparsers.add_parser(self.name, help=self.help)
        configure(parser)
        return parser


def _row(name: str, help: str) -> Command:
    return Command(name, help, f"vitdecomp.commands.{name}:configure")


#: The subcommands, in the order ``--help`` lists them.
COMMANDS: list[Command] = [
    _row("analyze", "decompose, align to CLIP, describe and score every component; write an HTML + JSON report"),
    _row("decompose", "split a model's representation of some images into its parts; save them with --out"),
    _row("heatmap", "where in each image the chosen heads write along a text: PNG overlays + .npy maps"),
    _row("retrieve", "search an analysed image set by text or by example, through a feature's components"),
    _row("debias", "remove a spurious feature by mean-ablating the components that carry it (Waterbirds layout)"),
    _row("ablate", "mean-ablate layers from the last, and each feature's top components vs random ones"),
    _row("segment", "zero-shot segmentation from token contributions vs GradCAM and Chefer et al., scored on masks"),
    _row("features", "sparse-autoencoder features of the representation, named through the aligner, split over parts"),
    _row("world", "the built-in generated world (scenes with ground truth)"),
    _row("zoo", "the shipped small models: list them, train them again, measure them"),
    _row(
        "validate",
        "check every component score against causal, probe and planted ground truths (docs/validation.md)",
    ),
]
