"""fastdml's Triton kernels, installed as `fastdml.kernels`; importing it needs triton.

From the repository's root this folder is also on the path as a top-level package named `kernels`,
a name that belongs to a PyPI package (which transformers and its setuptools plugin import). So
when it is imported under any other name than `fastdml.kernels`, it hands the name on to the next
`kernels` on the path, or fails as if it were not there.
"""

if __name__ != "fastdml.kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    def _where(entry: str) -> str:
        return os.path.normcase(os.path.realpath(entry or os.curdir))

    _root = _where(os.path.dirname(os.path.dirname(__file__)))
    _path = [entry for entry in sys.path if _where(entry) != _root]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _path)
    if _spec is None:
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module
    _spec.loader.exec_module(_module)
