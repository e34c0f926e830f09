"""One module per `megatron <command>`; each exposes `run(argv)`."""
