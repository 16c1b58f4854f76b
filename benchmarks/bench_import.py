"""What a user feels first: importing fastce and the first call (compile or cache load)."""


class ImportAndFirstCall:
    """Fresh interpreter each sample: ``import fastce`` then one call.

    With Numba's on-disk cache populated (any earlier run) this measures
    cache loading; on a fresh install the first sample includes compilation.
    """

    params = [["import", "logsumexp", "cross_entropy", "cross_entropy_with_grad"]]
    param_names = ["what"]
    repeat = 3
    rounds = 1
    timeout = 120

    def timeraw_import_first_call(self, what):
        if what == "import":
            return "import fastce"
        call = {
            "logsumexp": "fastce.logsumexp(x)",
            "cross_entropy": "fastce.cross_entropy(x, y)",
            "cross_entropy_with_grad": "fastce.cross_entropy_with_grad(x, y)",
        }[what]
        return (
            "import numpy as np\n"
            "import fastce\n"
            "x = np.random.default_rng(0).standard_normal((512, 1000), dtype=np.float32)\n"
            "y = np.arange(512) % 1000\n"
            f"{call}\n"
        )
