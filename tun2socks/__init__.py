"""tun2socks: a transparent SOCKS5 proxy built on a user-space TCP/IP stack."""

__version__ = "0.1.0"
