import sys

from netslim.cli import main

sys.exit(main())
