"""User code for tests with real replica processes, importable by those processes."""
