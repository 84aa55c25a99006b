"""The DNS forwarder (installed as ``tun2socks_dns``; ``dns`` is dnspython's name)."""
