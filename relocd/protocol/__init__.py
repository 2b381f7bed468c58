"""The relocd wire protocol, sans-IO: bytes in, records out, one state table.

Nothing here imports asyncio, sockets or does I/O (a test checks the imports).
``records`` defines one class per record type, ``codec`` the framing,
``state`` the conversation state machine.  The spec is ``docs/protocol.md``.
"""
