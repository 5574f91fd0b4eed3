"""Training: catalog datasets, the balanced multitask sampler, the model (backbone, embedding, heads),
losses, the training loop, evaluation and export."""
