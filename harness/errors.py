"""Errors that reach the user as one clear line naming the fix."""


class HarnessError(Exception):
    """A failure the user can act on; its message says what to do."""


class ConfigError(HarnessError, ValueError):
    """A bad flag or config value (a ValueError too: code that parses values may catch it as one)."""


class EnvironmentMissing(HarnessError):
    """A host prerequisite (binary, package, device) is missing or broken."""


class ResultsUnreadable(HarnessError, ValueError):
    """A results.json that is missing, not JSON, or not of this schema."""
