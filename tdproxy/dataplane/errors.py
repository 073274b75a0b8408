"""Exceptions the hot path raises inside parser callbacks to refuse what it parsed."""


class BadResponse(Exception):
    """The backend's response cannot be forwarded safely: the client gets a 502."""
