"""What tun2socks shows of itself: the control API, metrics, snapshots, packet capture."""
