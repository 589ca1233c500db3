"""Command-line entry points of meddap.pipeline (registered by meddap.cli)."""


def register(subparsers) -> None:
    """Add this area's sub-commands to the `meddap` parser."""
