"""Downstream evaluation configs for ``python -m ssl_us.finetune`` (see ssl_us/finetune.py)."""
