import sys

from overcommitd.cli import main

sys.exit(main())
