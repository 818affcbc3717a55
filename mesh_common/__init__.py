"""Pure logic shared by the sidecar and the control plane (identity, the snapshot and config
model, validation); ``bench``, ``demo_services`` and ``chaos`` may import it too.

No I/O anywhere in this package, except on a command line: ``numbers`` (finite float flags,
for click and argparse; every entry point) and ``cli_args`` (the argparse parser of the
``python -m`` entry points in ``demo_services``, ``bench`` and ``tests/support``) print
nothing but a refused argument's one error line on stderr, or ``--help``.
"""
