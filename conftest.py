"""Root conftest: the harness's pytest plugin is loaded through its entry point (harness.plugin)."""
