import sys

from tmd.cli import main

sys.exit(main())
