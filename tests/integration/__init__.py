"""The namespace tests and their bed (bed.py, dnsbed.py and the helper programs), also used by
bench/: `from tests.integration import bed`."""
