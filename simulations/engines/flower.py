"""Run the real ClientApp and ServerApp on Flower's Simulation Engine (Ray backend)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.supercore.telemetry import EventType

from fedpref.models.config import FederatedConfig

if TYPE_CHECKING:
    from fedpref.server.app import ServerHooks


def backend_config(*, cpus_per_device: float = 1.0, ray_address: str | None = None, num_cpus: int | None = None) -> dict:
    """Ray resources: CPUs per virtual device, and an existing cluster's address if any."""
    init_args: dict = {"logging_level": logging.ERROR, "log_to_driver": False}
    if ray_address:
        init_args["address"] = ray_address
    elif num_cpus:
        init_args["num_cpus"] = num_cpus
    return {"client_resources": {"num_cpus": cpus_per_device, "num_gpus": 0.0}, "init_args": init_args}


def run_flower_simulation(config: FederatedConfig, *, n_devices: int, backend: dict | None = None, verbose: bool = False,
                          client_app=None, hooks: ServerHooks | None = None) -> dict:
    """Run ``config`` on ``n_devices`` virtual SuperNodes; returns the server's summary (what
    rounds.json holds). ``client_app``: another ClientApp for the devices (default fedpref's;
    e.g. :data:`fedpref.simulations.experiments.hostile.app`, which makes one of them hostile).
    ``hooks``: the server's listeners of this run (the ServerApp runs in this process).

    ``flwr.simulation.run_simulation`` does not read ``[tool.flwr.app.config]`` and takes no
    run config, so the resolved config is written as the app config of a small app folder
    that the Simulation Engine reads for every device, and handed to the ServerApp directly.
    """
    from flwr.app import Context, RecordDict
    from flwr.simulation.run_simulation import _run_simulation

    from fedpref.simulations.engines.device import app as honest_app
    from fedpref.server.app import ServerHooks, make_server_app

    client_app = client_app or honest_app

    if not config.results_dir:
        raise ValueError("set results_dir: the server writes its rounds there")
    run_config = config.to_run_config()
    hooks = hooks or ServerHooks()
    results = []

    def on_result(result) -> None:
        results.append(result)
        if hooks.on_result is not None:
            hooks.on_result(result)

    server_app = make_server_app(replace(hooks, on_result=on_result))
    with tempfile.TemporaryDirectory(prefix="fedpref-app-") as app_dir:
        lines = ["[project]", 'name = "fedpref-simulation"', 'version = "0.0.0"', "", "[tool.flwr.app]", 'publisher = "fedpref"', "", "[tool.flwr.app.components]",
                 'serverapp = "fedpref.server.app:app"', 'clientapp = "fedpref.simulations.engines.device:app"', "", "[tool.flwr.app.config]"]
        lines += [f"{key} = {json.dumps(value)}" for key, value in run_config.items()]
        Path(app_dir, "pyproject.toml").write_text("\n".join(lines) + "\n")
        server_context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config))
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        if not verbose:  # Flower logs every round at INFO; fedpref shows its own progress
            logging.getLogger("flwr").setLevel(logging.WARNING)
        _run_simulation(
            num_supernodes=n_devices,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app=client_app,
            server_app=server_app,
            backend_name="ray",
            backend_config=backend or backend_config(),
            server_app_context=server_context,
            app_dir=app_dir,
            is_app=True,  # makes the engine read the app folder's config for every device
            verbose_logging=verbose,
        )
    if not results:
        raise RuntimeError("the Simulation Engine ended without a result from the ServerApp (see its log)")
    return results[-1].summary()
