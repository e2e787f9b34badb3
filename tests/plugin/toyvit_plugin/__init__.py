"""A tiny package that brings its own ViT class and registers a vitdecomp adapter for it through the
``vitdecomp.adapters`` entry point (tests/test_plugins.py installs it into a temporary folder)."""
