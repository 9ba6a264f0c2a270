import sys

from tmd.programs.cli import main

sys.exit(main())
