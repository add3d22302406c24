"""Reference workloads that vramscope profiles (a nanoGPT-style GPT and its training loop)."""
