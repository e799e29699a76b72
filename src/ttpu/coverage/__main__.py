import sys

from ttpu.coverage.cli import main

sys.exit(main())
