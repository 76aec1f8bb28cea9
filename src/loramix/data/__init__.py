"""The data stages: sources -> mixture -> tokens -> packing; `prepare.prepare_data` runs them in order."""
