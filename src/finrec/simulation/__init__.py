"""Closed-loop simulation: the synthetic world's customers call the live service and react to its answers.

* :mod:`~finrec.simulation.customers`: :class:`SimulatedCustomers`, the seeded reaction model (the ground
  truth's funnel, with position bias, evolving holdings and optional injected drift);
* :mod:`~finrec.simulation.loop`: :func:`run_simulation`, Poisson arrivals against ``finrec serve``;
* :mod:`~finrec.simulation.report`: :class:`SimulationReport`, tallies per model version and arm, failures,
  and conversion over time (``finrec simulate`` writes it as JSON and a plot). See docs/simulation.md.
"""

from finrec.simulation.customers import Reaction, SimulatedCustomers
from finrec.simulation.loop import run_simulation
from finrec.simulation.report import SimulationReport, Tally

__all__ = ["Reaction", "SimulatedCustomers", "SimulationReport", "Tally", "run_simulation"]
