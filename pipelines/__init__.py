"""Operations: the `lookalike` command line, Kubeflow components and pipelines, canary rollouts."""
