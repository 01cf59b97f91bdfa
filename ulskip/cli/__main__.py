"""`python -m ulskip.cli ...` (what `torchrun -m ulskip.cli train ...` runs)."""
import sys

from ulskip.cli import main

sys.exit(main())
