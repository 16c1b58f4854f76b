"""Roof references: what one pass over the same logits costs on this machine.

``time_read`` streams the logits once (a parallel sum): no implementation
of a reduction over them can beat it.  ``time_read_write`` reads them and
writes an array of the same size: the floor for anything that produces
N x C (log_softmax, softmax, the gradient).  The report divides these by an
implementation's time to give its fraction of the roof.
"""

import numpy as np

from . import common as C


class Roof:
    params = [C.BATCHES, C.CLASSES, C.DTYPES]
    param_names = ["batch", "classes", "dtype"]
    timeout = 300

    def setup(self, batch, classes, dtype):
        C.skip_if_too_large(batch * classes)

        def build():
            x = C.make_logits((batch, classes), dtype)
            out = np.empty_like(x)
            C.configure_threads()
            for _ in range(2):  # compile / load from cache, fault in pages
                C.roof_read(x)
                C.roof_read_write(x, out)
            return x, out

        self.x, self.out = C.memoize(("roof", batch, classes, dtype), build)

    def time_read(self, batch, classes, dtype):
        C.roof_read(self.x)

    def time_read_write(self, batch, classes, dtype):
        C.roof_read_write(self.x, self.out)


class RoofKDim(Roof):
    params = [C.KDIM_SHAPES, C.DTYPES]
    param_names = ["shape", "dtype"]

    def setup(self, shape, dtype):
        # same bytes as (N*H*W, C): the roof depends on the size only
        n, c, *spatial = shape
        super().setup(int(np.prod(shape)) // c, c, dtype)

    def time_read(self, shape, dtype):
        C.roof_read(self.x)

    def time_read_write(self, shape, dtype):
        C.roof_read_write(self.x, self.out)


class Threads:
    """Record the thread count every implementation ran with."""

    unit = "threads"

    def track_num_threads(self):
        C.configure_threads()
        return C.n_threads()
