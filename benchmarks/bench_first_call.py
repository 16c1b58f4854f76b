"""The first cross_entropy call a user makes, with numba's on-disk cache empty or filled.

Each sample is a fresh interpreter (``timeraw_``) with its own new ``NUMBA_CACHE_DIR``:
"empty" compiles every kernel the call needs; "filled" first runs the same call in another
process (untimed) so the timed one only loads machine code, which is what a user sees after
``python -m fastce precompile`` or any earlier run.  ``what``: "import" times
``import fastce`` alone (numba included); the others time the import and one
``cross_entropy`` on float32 logits of that shape (4x10: the tiny-call kernel; 512x1000: the
parallel kernel).  The README's "First use" section quotes these figures.
"""

SHAPES = {"4x10": (4, 10), "512x1000": (512, 1000)}

_SETUP = """
import atexit, os, shutil, subprocess, sys, tempfile
os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastce-first-call-")
atexit.register(shutil.rmtree, os.environ["NUMBA_CACHE_DIR"], True)
import numpy as np
x = np.random.default_rng(0).standard_normal({shape}).astype(np.float32)
y = np.arange({shape}[0]) % {shape}[1]
CALL = "fastce.cross_entropy(x, y)"
if {fill}:
    subprocess.run([sys.executable, "-c", "import numpy as np, fastce; "
                    "x = np.zeros({shape}, np.float32); y = np.arange({shape}[0]) % {shape}[1]; "
                    + CALL], check=True)
"""


class FirstCall:
    params = [["empty", "filled"], ["import", "4x10", "512x1000"]]
    param_names = ["cache", "what"]
    number = 1
    repeat = 3
    rounds = 1
    warmup_time = 0
    timeout = 600

    def setup(self, cache, what):
        if cache == "empty" and what == "import":
            raise NotImplementedError("import compiles nothing: same as with a filled cache")

    def timeraw_first_call(self, cache, what):
        shape = SHAPES.get(what, (4, 10))
        setup = _SETUP.format(shape=shape, fill=cache == "filled")
        stmt = "import fastce" if what == "import" else "import fastce\nfastce.cross_entropy(x, y)"
        return stmt, setup
