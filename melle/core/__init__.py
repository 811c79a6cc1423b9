"""The torch-free core shared by the reference, the exporters and the runtime: config, mel
audio, text, noise, the decode loop, the engine manifest, KV naming, file writing and CLI
error conventions. Nothing here imports torch; ``melle``'s other modules (the model,
training, checkpoints) build on it, never the reverse."""
