"""On PYTHONPATH, makes `import torch` (and any torch submodule) raise ImportError in every
Python process that starts: `mlflow models serve`, its uvicorn workers, anything they run.
A deployable that serves with this in place has no torch on its path at all."""

import sys


class _RefuseTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"import of {name} refused: this process serves without torch")
        return None


sys.meta_path.insert(0, _RefuseTorch())
