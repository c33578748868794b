"""The engines that play a population of simulated devices: Flower's Simulation Engine, the in-process engine, the fast engine (with its compiled device round), and the simulated device they run."""
