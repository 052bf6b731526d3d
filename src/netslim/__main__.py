import sys

from netslim.cli.commands import main

sys.exit(main())
