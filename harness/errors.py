"""Errors that reach the user as one clear line naming the fix."""


class HarnessError(Exception):
    """A failure the user can act on; its message says what to do."""


class ConfigError(HarnessError):
    """A bad flag or config value."""


class EnvironmentMissing(HarnessError):
    """A host prerequisite (binary, package, device) is missing or broken."""
