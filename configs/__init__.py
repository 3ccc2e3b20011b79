"""The configs shipped with pflight, as data of the package ``pflight.configs``.

Name them without the folder and the suffix: ``pflight fit --config fedavg/digits``; ``pflight configs``
lists them (see :mod:`pflight.named_configs`).
"""
