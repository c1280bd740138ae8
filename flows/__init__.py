"""The Prefect flows (mix, evaluate, compare, deploy) and the runtime they share.

Prefect sends analytics from the process that imports it and from the server it
starts, and reads the setting when it is imported: turning them off here, before any
flow module imports Prefect, covers every caller (the CLI, benchmarks, Python users)
and the temporary server, which inherits the environment. An explicit setting wins.
"""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
