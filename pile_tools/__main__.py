import sys

from pile_tools.cli import main

sys.exit(main())
