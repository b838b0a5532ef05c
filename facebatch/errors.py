"""The errors every layer raises, in a module that imports nothing, so that the lowest layers
(storage) and the highest (config, the CLI) can share them without importing each other."""


class ConfigError(ValueError):
    """A bad argument or configuration value; the message says what to change."""
