"""Deployment: canary rollouts of a model and its index (`rollout`) and the offline checks of the
Kustomize manifests (`manifest_check`)."""
