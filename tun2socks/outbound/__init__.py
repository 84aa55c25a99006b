"""Outbound connections: how a flow leaves the machine (SOCKS5, later direct)."""
