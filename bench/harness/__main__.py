"""`python -m harness memory SIZE N T METHOD THREADS` (bench/ on PYTHONPATH): one fresh-process memory measurement."""

import json
import sys

from .points import measure_memory_here

if len(sys.argv) > 1 and sys.argv[1] == "memory":
    size, n, t, method, threads = sys.argv[2:]
    print(json.dumps(measure_memory_here(size, int(n), int(t), method, int(threads))))
else:
    from . import __doc__

    print(__doc__)
