"""Support code shared by the unit tests and the fuzz harnesses: the TCP test client and stack
builder (tcp_helpers), the TCP fuzz model, the packet and DNS fuzz cases, the import scanner."""
