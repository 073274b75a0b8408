"""Test doubles that talk over real sockets: a fake backend server, process runners, a raw client.

Nothing here imports ``tdproxy``: the fakes must not share the bugs of the code they test.
"""
