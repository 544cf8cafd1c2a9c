"""`python -m agent.app.cli`."""

import sys

from agent.app.cli import main

sys.exit(main())
