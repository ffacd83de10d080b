"""The version, as a literal: the build reads it without importing the package (or torch)."""
__version__ = "0.1.0"
