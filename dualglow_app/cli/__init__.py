"""The command-line entry points: they parse and dispatch, the stages do the work.

- ``dualglow`` (:mod:`dualglow_app.cli.bids_app`): the BIDS-App, participant and group levels;
- ``dualglow-evaluate`` (:mod:`dualglow_app.cli.evaluate`): the paper's experiments;
- ``dualglow-phantom`` (:mod:`dualglow_app.cli.phantom`): the synthetic paired cohort.
"""

from dualglow_app.cli.bids_app import main

__all__ = ["main"]
