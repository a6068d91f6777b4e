"""Test support shipped with the package: simulated devices, storages, contract suites."""
