"""The KServe predictor: loads a published model and index, embeds preprocessed photos and searches the FAISS index."""
