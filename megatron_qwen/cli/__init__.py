"""The `megatron-qwen` command (`main`) and its subcommands, one module each: preprocess, convert, generate,
forward, plan, plot, build_cache and run (a training stage under torchrun)."""
