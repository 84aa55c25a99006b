"""The test suite, one package: `tests.support` (shared helpers), `tests.unit` (grouped like the
source tree), `tests.integration` (the namespace bed) and `tests.fuzz` (atheris harnesses)."""
