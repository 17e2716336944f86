"""Build a Hub folder with a model card and upload it (the `spannorm-publish` command, run from a clone); see
spannorm_hf.integrations.hub."""

import sys

from spannorm_hf.integrations.hub import publish_main

if __name__ == "__main__":
    sys.exit(publish_main())
