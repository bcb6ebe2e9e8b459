"""Shared test settings. `pytest -m "not slow"` is the quick developer loop; CI (the
README's test command) runs everything."""


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: evidence and end-to-end tests (subprocesses, training runs, "
        "multi-process jobs); deselect with -m 'not slow' for a quick loop")
