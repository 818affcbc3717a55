"""The demo launcher's parts: settings from the environment, the run state (``state.json``),
detached processes, the control plane's admin API, bringing the mesh up and down, and the
live panel. The command line is ``demo_services.demo``."""
