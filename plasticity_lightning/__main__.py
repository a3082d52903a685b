"""``python -m plasticity_lightning`` is the ``plasticity`` command."""

from plasticity_lightning.cli import main

if __name__ == "__main__":
    main()
