"""Performance benchmarks of ``cl_lib`` against peer libraries (see ``benchmarks/README.md``)."""
