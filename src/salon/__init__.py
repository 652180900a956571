"""salon — a self-hostable, ChatGPT-class assistant platform."""

import os

# numpy's OpenBLAS starts one thread per core for every matrix product. salon's products are
# small (one embedding for a memory search or a safety check), run while llama.cpp and other
# requests hold the cores, and come from many requests at once: measured on the 2-core box
# under load, embedding one turn took p50 53 ms / p95 500 ms multi-threaded against 11 / 22 ms
# single-threaded. Set before numpy is first imported; an operator's own value wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
