"""The package version, in a module of its own so that core modules never import the package's `__init__`."""
__version__ = "0.1.0"
