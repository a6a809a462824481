"""The VM tier's tests (a package, so that its conftest is `vm.conftest` and never shadows
the `conftest` that tests elsewhere import their helpers from)."""
