"""The `xtok` command line: one click group whose sub-commands live one per module in this package.

Commands are imported only when invoked (LazyGroup), so `xtok --help` stays fast and
torch/transformers load only for the commands that need them.
"""
from __future__ import annotations

import importlib

import click

# command name -> "module:attribute" (relative to this package)
COMMANDS = {
    "align": "align:align_cmd",
    "build-projection": "projection:build_projection_cmd",
    "extract": "extract:extract_cmd",
    "inspect": "inspect:inspect_cmd",
    "demo": "demo:demo_cmd",
}

SHORT_HELP = {
    "align": "Show how two tokenizers split the same text (chunks, gaps, stats).",
    "build-projection": "Build the sparse teacher->student vocab projection matrix W.",
    "extract": "Run a teacher over a dataset and store top-k log-probs.",
    "inspect": "Summarise a teacher store and render one example.",
    "demo": "Offline end-to-end demo on the real tokenizers mistral-common ships.",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        target = COMMANDS.get(name)
        if target is None:
            return None
        mod, attr = target.split(":")
        return getattr(importlib.import_module(f"{__name__}.{mod}"), attr)

    def format_commands(self, ctx, formatter):
        rows = [(n, SHORT_HELP.get(n, "")) for n in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="xtok")
def main():
    """xtok: cross-tokenizer knowledge distillation.

    Typical flow: `xtok build-projection` once per tokenizer pair, `xtok extract` once per
    teacher and dataset, then train with `xtok.CrossTokenizerCollator` and
    `xtok.MultiTeacherLossAggregator` in your own loop.
    """


if __name__ == "__main__":  # pragma: no cover
    main()
