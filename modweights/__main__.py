"""``python -m modweights verify|bench ...``: the same as the ``modweights`` command."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
