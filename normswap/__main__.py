"""``python -m normswap`` (and ``torchrun -m normswap recalibrate ...``): the command line."""
from .cli import main_entry

main_entry()
