"""Model layer of the workbench: settings, catalog, manager, families. Free of gradio."""

__version__ = "0.1.0"
