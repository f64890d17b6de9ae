"""Container build step: fetch the MNI152NLin2009cAsym templates into TEMPLATEFLOW_HOME.

Run once in the Dockerfile (with network) so the image works offline; the same function
falls back to the templates that ship inside installed wheels when there is no network.
"""

from dualglow_app.log import setup_logging
from dualglow_app.templates import prefetch

if __name__ == "__main__":
    setup_logging(0)
    prefetch()
