"""Lookalike: visual product search (multitask EfficientNet embeddings, FAISS IVF, KServe, Kubeflow).

One import name holds every room; each is found by its folder:

    lookalike.core         torch-free contracts every unit uses: errors and their status, settings read
                           from the environment, S3 and versioned artifacts, the model and index cards,
                           decoding and preprocessing
    lookalike.catalogs     the catalog format, rows and layout in the store, validation, importers
    lookalike.serving      the KServe v2 layer both servers share: errors on the wire, request ids, the
                           public surface, metrics
    lookalike.transformer  the KServe transformer (folder `transformer/`; no torch)
    lookalike.training     model, sampler, losses, training loop, evaluation, export (folder `training/`)
    lookalike.predictor    embedding, the FAISS index (`lookalike.predictor.index`), the KServe predictor
                           (folder `predictor/`)
    lookalike.pipelines    Kubeflow components and pipelines, compile, local and cluster runs (`pipelines/`)
    lookalike.cli          the `lookalike` command line, one module per verb
    lookalike.app          the app side: Python client, try page, local serving stack, demo
    lookalike.deploy       canary rollouts and offline manifest checks

Imports flow one way, down this list (tests/test_layout.py holds the tree to it). This file imports
nothing, so importing one room never drags in another.
"""
