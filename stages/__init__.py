"""Pipeline stages: one module per DVC stage (`python -m stages.<name>`), see dvc.yaml.

Shared helpers live in `stages.common`; stages never import each other.
"""
