"""The two things every configuration section needs, with no imports of the package: a dataclass field
with one line of help, and the errors a user's mistake raises. Agent packages define their own
sections with these (gorila_zmq/agents/*/config.py), and gorila_zmq.config composes them."""
from __future__ import annotations

from dataclasses import field


class UserError(Exception):
    """A mistake the user fixes (a configuration, an argument, a file name, a host that cannot be
    reached): the command line says it in one clear line, with no traceback."""


class ConfigError(UserError, ValueError):
    """A wrong configuration, argument or file name."""


def help_field(default, help: str, **kw):
    """A dataclass field with a help line (shown by `gorila-zmq config`)."""
    if isinstance(default, (list, dict, tuple)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)
