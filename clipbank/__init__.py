"""The `clipbank` command line: a thin layer over model_store, training, service and benchmarks."""
