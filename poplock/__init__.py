"""poplock: POP-before-SMTP relay authorization from the systemd journal.

journal -> reader -> login parsing -> grants -> store <- relaylock / policy / expire / cli

Kept empty on purpose: relaylock imports this package once per SMTP connection.
"""

__version__ = "0.1.0"
