"""Build a Hub folder with a model card and upload it; see spannorm_hf.hub."""

import sys

from spannorm_hf.hub import publish_main

if __name__ == "__main__":
    sys.exit(publish_main())
