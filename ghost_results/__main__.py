"""`python -m ghost_results convert RUN ...`: see ghost_results.convert."""
import sys

from ghost_results.convert import main

sys.exit(main())
