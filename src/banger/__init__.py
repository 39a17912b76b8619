"""banger: a microVM manager for developers and coding agents."""

__version__ = "0.1.0"
