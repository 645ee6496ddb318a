"""`xtok build-projection`: build the sparse teacher->student projection matrix W.

The builder is one-time tooling in `projection_tools.build`; this module only registers its click command."""
from __future__ import annotations

from projection_tools.build import make_build_command

build_projection_cmd = make_build_command("build-projection")
