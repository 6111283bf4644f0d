"""``python -m avalanche_sdlora.run``: the experiment runner's command line
(:mod:`avalanche_sdlora.runner.cli`), kept at this path as the documented entry point."""

import sys

from avalanche_sdlora.runner.cli import main

if __name__ == "__main__":
    sys.exit(main())
