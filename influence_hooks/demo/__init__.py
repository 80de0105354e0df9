"""The demo and the example setups: small models and data (models.py), the demo itself (run.py).

    from influence_hooks.demo.run import demo
    from influence_hooks.demo.models import DigitsDataModule, DigitsMLP
"""
