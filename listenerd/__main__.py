import sys

from listenerd.cli import main

sys.exit(main())
