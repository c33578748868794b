"""fedpref: on-device federated personalisation.

The top-level folders of the repository are mapped into this namespace:
``client/`` is :mod:`fedpref.client`, ``server/`` is :mod:`fedpref.server`,
``models/`` is :mod:`fedpref.models` and ``simulations/`` is :mod:`fedpref.simulations`.
The ``fedpref`` command is :mod:`fedpref.cli`: it mounts each role's commands.
"""

__version__ = "0.1.0"
