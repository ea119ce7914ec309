"""Integrations with optional dependencies (tensorboard, optuna, torch.distributed, export).

Nothing is imported here: each module imports its dependency only when used, with an ImportError that names
the extra to install (``pip install 'lanterna[tensorboard]'`` ...).
"""
