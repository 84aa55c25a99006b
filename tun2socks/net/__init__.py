"""The sans-IO TCP/IP stack: no sockets, no clock, no asyncio in this package."""
