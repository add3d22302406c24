"""Other tools' formats and hosts: memory_viz snapshots in and out (memviz), the pytest
plugin (pytest_plugin). Framework callbacks (transformers, Lightning) live in
profiler.integrations, the import path their users write."""
