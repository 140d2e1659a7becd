"""The events an admin filters or alerts on, each with a fixed journal MESSAGE_ID.

`journalctl MESSAGE_ID=<id>` finds every occurrence; the catalog file (catalog/poplock.catalog)
explains each one. Data travels in POPLOCK_* fields, never only inside the text:
POPLOCK_CLIENT_ADDRESS, POPLOCK_SOURCE (the login source), POPLOCK_SOURCE_UNIT (the
unit the login entry came from), POPLOCK_EXPIRES (when a grant ends, ISO 8601),
POPLOCK_STORE (the store an administrative change was made to; changes.py replays them),
POPLOCK_USER (the user whose login opened a grant, on logins and on relay decisions, so
that `journalctl POPLOCK_USER=alice` lists every relay that account enabled).

No imports: relaylock uses these identifiers too.
"""


class Event:
    __slots__ = ("name", "message_id", "summary")

    def __init__(self, name: str, message_id: str, summary: str):
        self.name = name
        self.message_id = message_id
        self.summary = summary


LOGIN_GRANTED = Event("login-granted", "94abcd90390d4937a29d2e5bcbac14f8", "A login let a client relay")
GRANT_EXTENDED = Event("grant-extended", "0f8cbd37fa004fa086298b51c32f4dec", "A new login extended a grant")
GRANT_ADDED = Event("grant-added", "5df0f3db55ae4c64a84d7d653d22380e", "An administrator added a grant")
GRANT_REMOVED = Event("grant-removed", "ecbec00bdae1438badd8459f38822a82", "An administrator removed grants")
GRANTS_FLUSHED = Event("grants-flushed", "51595ec888d0411bb6926f34d4a4bd4a", "An administrator removed every grant")
GRANT_EXPIRED = Event("grant-expired", "ebcf1832719e4426bf3b54e534e44ca9", "An expired grant was purged")
LOGIN_TOO_OLD = Event("login-too-old", "5ca84ab46e1f4bf5a5dd75bad1e4f913",
                      "A login was read after its window had passed and granted nothing")
LOGIN_DENIED = Event("login-denied", "74adba8ade3b444fa7873da3979ec77c",
                     "A login was refused a grant by the deny list")
LOGIN_OVER_LIMIT = Event("login-over-limit", "881253df0333467f8689bd398cd76874",
                         "A user's logins already hold grants for as many addresses as allowed")
RELAY_ALLOWED = Event("relay-allowed", "d398fa448e0248df89fa1308a8b8efdd", "A client was allowed to relay")
RELAY_REFUSED = Event("relay-refused", "56705e3ed83c4c489c5a67e4b60bbc0a", "A client was not allowed to relay")
STORE_BUSY = Event("store-busy", "ed98281416d74f79996a93827bb8e92d",
                   "The grant store stayed locked past its bound; the relay was refused")
STORE_FAILED = Event("store-failed", "c05314cfd7c74891b0443f2f030f61e4",
                     "The grant store could not be read or written")
CURSOR_RESET = Event("cursor-reset", "f2d4fec3434d458b90f76f139179bc00",
                     "The reader could not resume at its saved journal position")
CONFIG_INVALID = Event("config-invalid", "2dd5657b83f7497e897541d487eef092", "The configuration is invalid")
LOGIN_UNMATCHED = Event("login-unmatched", "53bd387c620d4c6bac4e1150fb3b0eae",
                        "A watched server logs login lines that no pattern reads")
STORE_REBUILT = Event("store-rebuilt", "afd5c1a38dcf42c1bb5faa731dce9110",
                      "The grant store was missing or damaged and was rebuilt from the journal")
GRANT_RELEASED = Event("grant-released", "f3644806fd0b4526a7b8f9b11bda5959",
                       "The last open session holding a grant ended; the window runs from its end")
SESSIONS_ENDED = Event("sessions-ended", "cc9f2e6ba90f42ba834ca3f40851047d",
                       "A server restart ended every open session of its clients")
READER_STARTED = Event("reader-started", "1b303b18e6784ae4aaba2306d31fb1dc", "The reader started following the journal")

EVENTS = (
    LOGIN_GRANTED, GRANT_EXTENDED, GRANT_ADDED, GRANT_REMOVED, GRANTS_FLUSHED, GRANT_EXPIRED, LOGIN_TOO_OLD,
    LOGIN_DENIED, LOGIN_OVER_LIMIT,
    RELAY_ALLOWED, RELAY_REFUSED, STORE_BUSY, STORE_FAILED, STORE_REBUILT, CURSOR_RESET, CONFIG_INVALID,
    LOGIN_UNMATCHED, READER_STARTED, GRANT_RELEASED, SESSIONS_ENDED,
)
