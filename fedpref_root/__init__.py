"""fedpref: on-device federated personalisation.

The top-level folders of the repository are mapped into this namespace:
``client/`` is :mod:`fedpref.client`, ``server/`` is :mod:`fedpref.server`,
``models/`` is :mod:`fedpref.models` and ``simulations/`` is :mod:`fedpref.simulations`.
"""

__version__ = "0.1.0"
