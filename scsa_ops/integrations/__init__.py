"""Hooks into the frameworks SCSA is used in. Each submodule imports its framework, so nothing
here is imported by `scsa_ops` itself: `import scsa_ops.integrations.ultralytics` (or
`.mmengine`) when that framework is installed. timm needs no hook (see the README)."""
