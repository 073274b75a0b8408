"""``python -m tdproxy.workers CHANNEL_FD SUPERVISOR_PID``: a worker process (see worker.py)."""

import sys

from tdproxy.workers.worker import main

raise SystemExit(main(sys.argv[1:]))
