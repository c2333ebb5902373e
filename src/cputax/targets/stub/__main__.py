"""`python -m cputax.targets.stub CONFIG_JSON`: StubServer(process=True)'s child."""

import sys

from cputax.targets.stub.server import child_main

if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1]))
